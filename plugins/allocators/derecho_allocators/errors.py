"""The one error class of the allocators plugin."""

from __future__ import annotations

from derecho_core import ConfigError


class LayoutError(ConfigError, ValueError):
    """A layout (policies or JSON) is invalid. ``path`` names the JSON element, e.g.
    ``layout[0].layout[1].min_nodes_by_shard[2]`` (None for a policy built in Python)."""

    def __init__(self, message: str, *, path: str | None = None, source: str | None = None,
                 key: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message, source=source, key=key)
