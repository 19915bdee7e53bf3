"""The HTTP side of the engine: the REST API (``create_app``) and its server (``ApiServer``)."""

from __future__ import annotations

from .rest import create_app
from .server import ApiServer

__all__ = ["ApiServer", "create_app"]
