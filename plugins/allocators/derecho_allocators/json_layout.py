"""JSON layouts (``[LAYOUT] json_layout`` / ``json_layout_file``, spec §2.3), checked element by element.

    [{"type_alias": "Foo",
      "layout": [{"min_nodes_by_shard": [2], "max_nodes_by_shard": ["3"],
                  "reserved_node_ids_by_shard": [["*1", "2", "3"]],
                  "delivery_modes_by_shard": ["Ordered"], "profiles_by_shard": ["DEFAULT"]}]},
     ...]

One top-level entry per subgroup type, in the group's type order; one
``layout`` entry per subgroup of that type; one array element per shard.
Every error names the JSON path of the offending element, e.g.
``layout[0].layout[1].min_nodes_by_shard[2]``.

Differences from Derecho's parser (docs/allocators.md): sizes may be integers
or strings (Derecho took only strings, though its README shows integers);
a delivery mode other than Ordered/Raw/Unordered is an error (Derecho read any
other word as Ordered); an unknown key such as the README's
``reserved_nodes_by_shard`` is an error that names the right key (Derecho
ignored it, so the reservation silently vanished); every pair of shards is
checked for shared reserved ids (Derecho compared only the first and the last);
``delivery_modes_by_shard`` and ``profiles_by_shard`` may be left out
(Ordered, DEFAULT).
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from derecho_core import Mode

from .errors import LayoutError
from .policies import ShardAllocationPolicy, SubgroupAllocationPolicy, custom_shards_policy

__all__ = ["parse_json_layout"]

SUBGROUP_KEYS = ("min_nodes_by_shard", "max_nodes_by_shard", "delivery_modes_by_shard", "profiles_by_shard",
                 "reserved_node_ids_by_shard")
_STALE = {"reserved_nodes_by_shard": "reserved_node_ids_by_shard"}  # README's name for it


class _Parser:
    def __init__(self, source: str | None) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> LayoutError:
        return LayoutError(message, path=path, source=self.source)

    def array(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected an array, got {_kind(value)}")
        return value

    def size(self, value: Any, path: str) -> int:
        if isinstance(value, str) and _digits(value.strip()):
            return int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise self.fail(path, f"expected a non-negative integer (or a string holding one), got {json.dumps(value)}")

    def node(self, value: Any, path: str) -> tuple[int, bool]:
        """A reserved node id; a leading ``*`` marks a designated sender."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, False
        if isinstance(value, str):
            text = value.strip()
            sender = text.startswith("*")
            digits = text[1:].strip() if sender else text
            if _digits(digits):
                return int(digits), sender
        raise self.fail(path, f"expected a node id such as \"3\", or \"*3\" for a designated sender, "
                              f"got {json.dumps(value)}")

    def mode(self, value: Any, path: str) -> Mode:
        if isinstance(value, str):
            try:
                return Mode.parse(value)
            except ValueError:
                pass
        raise self.fail(path, f"expected \"Ordered\" or \"Raw\", got {json.dumps(value)}")

    def profile(self, value: Any, path: str) -> str:
        if isinstance(value, str) and value.strip():
            return value.strip().upper()
        raise self.fail(path, f"expected a profile name, got {json.dumps(value)}")

    def subgroup(self, entry: Any, path: str) -> ShardAllocationPolicy:
        if not isinstance(entry, dict):
            raise self.fail(path, f"expected an object with min_nodes_by_shard, max_nodes_by_shard, ...; "
                                  f"got {_kind(entry)}")
        for key in entry:
            if key not in SUBGROUP_KEYS:
                hint = _STALE.get(key) or next(iter(difflib.get_close_matches(key, SUBGROUP_KEYS, n=1)), None)
                raise self.fail(f"{path}.{key}", "unknown key" + (f"; did you mean {hint!r}?" if hint else
                                f"; known keys: {', '.join(SUBGROUP_KEYS)}"))
        for key in ("min_nodes_by_shard", "max_nodes_by_shard"):
            if key not in entry:
                raise self.fail(path, f"missing {key!r}")
        mins_raw = self.array(entry["min_nodes_by_shard"], f"{path}.min_nodes_by_shard")
        n = len(mins_raw)
        if n == 0:
            raise self.fail(f"{path}.min_nodes_by_shard", "a subgroup needs at least one shard")

        def per_shard(key: str) -> list[Any] | None:
            if key not in entry:
                return None
            values = self.array(entry[key], f"{path}.{key}")
            if len(values) != n:
                raise self.fail(f"{path}.{key}", f"has {len(values)} entries but min_nodes_by_shard has {n}; "
                                                 "every *_by_shard array has one entry per shard")
            return values

        mins = [self.size(v, f"{path}.min_nodes_by_shard[{i}]") for i, v in enumerate(mins_raw)]
        maxs = [self.size(v, f"{path}.max_nodes_by_shard[{i}]")
                for i, v in enumerate(per_shard("max_nodes_by_shard") or [])]
        for i, (lo, hi) in enumerate(zip(mins, maxs, strict=True)):
            if lo > hi:
                raise self.fail(f"{path}.max_nodes_by_shard[{i}]",
                                f"maximum {hi} is below the minimum {lo} (min_nodes_by_shard[{i}])")
        modes_raw = per_shard("delivery_modes_by_shard")
        modes = [self.mode(v, f"{path}.delivery_modes_by_shard[{i}]") for i, v in enumerate(modes_raw)] \
            if modes_raw is not None else [Mode.ORDERED] * n
        profiles_raw = per_shard("profiles_by_shard")
        profiles = [self.profile(v, f"{path}.profiles_by_shard[{i}]") for i, v in enumerate(profiles_raw)] \
            if profiles_raw is not None else ["DEFAULT"] * n
        reserved: list[set[int]] = []
        senders: list[set[int]] = []
        reserved_raw = per_shard("reserved_node_ids_by_shard")
        for i, shard in enumerate(reserved_raw or []):
            spath = f"{path}.reserved_node_ids_by_shard[{i}]"
            ids: set[int] = set()
            marked: set[int] = set()
            for k, v in enumerate(self.array(shard, spath)):
                node, is_sender = self.node(v, f"{spath}[{k}]")
                if node in ids:
                    raise self.fail(f"{spath}[{k}]", f"node {node} is listed twice in this shard")
                ids.add(node)
                if is_sender:
                    marked.add(node)
            for j, earlier in enumerate(reserved):
                common = ids & earlier
                if common:
                    raise self.fail(spath, f"shards {j} and {i} of one subgroup both reserve node(s) "
                                           f"{sorted(common)}; a node may hold one shard per subgroup")
            reserved.append(ids)
            senders.append(marked)
        return custom_shards_policy(mins, maxs, modes, profiles, reserved_node_ids_by_shard=reserved,
                                    reserved_sender_ids_by_shard=senders if any(senders) else None)

    def layout(self, doc: Any) -> tuple[list[SubgroupAllocationPolicy], list[str | None]]:
        types = self.array(doc, "layout")
        policies, aliases = [], []
        for t, element in enumerate(types):
            path = f"layout[{t}]"
            if not isinstance(element, dict):
                raise self.fail(path, f"expected an object with a \"layout\" array, got {_kind(element)}")
            if "layout" not in element:
                raise self.fail(path, "missing \"layout\": the array of this type's subgroups")
            alias = element.get("type_alias")
            if alias is not None and not isinstance(alias, str):
                raise self.fail(f"{path}.type_alias", f"expected a string, got {_kind(alias)}")
            subgroups = self.array(element["layout"], f"{path}.layout")
            shard_policies = tuple(self.subgroup(s, f"{path}.layout[{i}]") for i, s in enumerate(subgroups))
            policies.append(SubgroupAllocationPolicy(len(shard_policies), False, shard_policies))
            aliases.append(alias)
        return policies, aliases


def _digits(text: str) -> bool:
    """ASCII digits int() takes: str.isdigit() also accepts '²' (int() refuses it), and int() refuses 4300+ digits."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def parse_json_layout(layout: str | list[Any], *, source: str | None = None
                      ) -> tuple[list[SubgroupAllocationPolicy], list[str | None]]:
    """Policies, one per type in order, and each entry's ``type_alias`` (or None)."""
    parser = _Parser(source)
    if isinstance(layout, (str, bytes)):
        try:
            doc = json.loads(layout)
        except json.JSONDecodeError as exc:
            raise parser.fail("layout", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
        except RecursionError:
            raise parser.fail("layout", "not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. a number of 4300+ digits
            raise parser.fail("layout", f"not valid JSON ({exc})") from None
    else:
        doc = layout
    return parser.layout(doc)
