"""derecho-py transport over plain TCP sockets (provider ``sockets``), pure Python."""

from .transport import SocketsTransport

__all__ = ["SocketsTransport"]
