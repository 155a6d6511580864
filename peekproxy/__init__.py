"""peekproxy: room peeking for Matrix homeservers (MSC2753 over MSC2444)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("peekproxy")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
