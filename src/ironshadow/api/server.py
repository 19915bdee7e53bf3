"""Serve the REST API with uvicorn on the engine's running event loop.

``uvicorn.Server.serve()`` installs SIGINT and SIGTERM handlers when it runs on the main
thread, and ``Server.startup()`` calls ``sys.exit()`` when it cannot bind. The engine's CLI
owns the signals and must report a busy port itself, so ``ApiServer`` binds the sockets
first (a busy port raises OSError) and then calls uvicorn's ``startup(sockets=...)``,
``main_loop()`` and ``shutdown()`` directly. Checked against uvicorn 0.55.

WebSocket connections (``/ws`` and ``/mqtt``) use uvicorn's ``websockets-sansio``
implementation, whose flow control api/mqtt_websocket.py relies on. ``stop()`` closes them
before uvicorn's own shutdown, which would close them with 1012 and no MQTT DISCONNECT.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from .feed import FeedConfig
from .rest import create_app
from .security import HttpAuth

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("ironshadow.api")
# uvicorn logs its routine start and stop lines at INFO under the name "uvicorn.error", which
# reads like a failure in the engine's log; ironshadow.api logs those events itself.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

# Seconds that stop() waits for requests in progress before it cancels them.
GRACEFUL_SHUTDOWN_TIMEOUT = 5.0
# listen() backlog of the HTTP sockets. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
# Smallest limit on one received WebSocket message, in bytes. The limit is the broker's
# maximum packet size when that is larger, so that any packet the broker accepts fits in
# one message. 64 KiB leaves room for feed requests when the packet size is set very low.
MIN_WEBSOCKET_MESSAGE_BYTES = 64 * 1024


class ApiServer:
    """The REST API and the WebSocket endpoints on ``host``:``port``, started and stopped
    with the engine.

    ``port`` 0 picks a free port, and ``ports`` returns it after ``start()``. ``feed``
    configures the ``/ws`` feed of the app built here; it is ignored when ``app`` is given.
    With ``ssl_context`` every endpoint is served over HTTPS, and the WebSocket ones as wss.
    ``auth`` turns on tokens and roles for the app built here. ``sockets`` are HTTP sockets
    bound already (by a cluster's supervisor) to serve instead of binding ``host``:``port``.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 8080,
        app: FastAPI | None = None,
        feed: FeedConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        auth: HttpAuth | None = None,
        sockets: list[socket.socket] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.app = (
            app if app is not None else create_app(engine, feed_config=feed, auth=auth)
        )
        self._websocket_message_limit = max(
            engine.broker.config.max_packet_size, MIN_WEBSOCKET_MESSAGE_BYTES
        )
        self._server: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []
        self._bound = sockets
        self._ticks: asyncio.Task[None] | None = None

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for sock in self._sockets]

    async def start(self) -> None:
        """Bind and start serving on the running event loop.

        Raises OSError (with the errno of the failure, EADDRINUSE for a busy port) when
        the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the REST API server is already running")
        sockets = self._bound if self._bound is not None else bind_sockets(self.host, self.port)
        self._bound = None
        ssl_context = self.ssl_context
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            loop="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            backlog=LISTEN_BACKLOG,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT,
            ws="websockets-sansio",
            ws_max_size=self._websocket_message_limit,
            ssl_context_factory=(
                None if ssl_context is None else lambda _config, _default: ssl_context
            ),
        )
        config.load()
        server = uvicorn.Server(config)
        # Server.serve() sets this attribute before it calls startup(). This class calls
        # startup() itself to keep uvicorn's signal handlers out.
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=sockets)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._server = server
        self._sockets = sockets
        # main_loop() refreshes the Date header once a second until should_exit is set.
        self._ticks = asyncio.get_running_loop().create_task(
            server.main_loop(), name="ironshadow-api-ticks"
        )
        scheme = "http" if ssl_context is None else "https"
        addresses = ", ".join(_format_address(sock, scheme) for sock in sockets)
        log.info(
            "REST API listening on %s, dashboard at /, OpenAPI docs at /docs, shadow feed "
            "at /ws, MQTT over WebSocket at /mqtt",
            addresses,
        )

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish, and close the sockets."""
        server = self._server
        if server is None:
            return
        self._server = None
        # As on the TCP listener, MQTT clients get DISCONNECT with "server shutting down" and
        # their wills are not published. Feed clients get close code 1001.
        for endpoint in (
            getattr(self.app.state, "mqtt_websockets", None),
            getattr(self.app.state, "feed", None),
        ):
            if endpoint is not None:
                await endpoint.close_all(GRACEFUL_SHUTDOWN_TIMEOUT)
        server.should_exit = True
        if self._ticks is not None:
            await self._ticks
            self._ticks = None
        await server.shutdown(sockets=self._sockets)
        self._sockets = []
        log.info("REST API stopped")


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind a TCP socket on every address that ``host`` resolves to, all on one port.

    With ``port`` 0 the first socket gets a free port and the others reuse it. Raises
    OSError, keeping the errno, when any address cannot be bound.
    """
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    bound: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in bound:
                continue
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # The IPv4 address gets its own socket, as asyncio's create_server does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            bound.add((family, address[0]))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise OSError(
            exc.errno, f"cannot listen for HTTP on {host}:{port}: {exc.strerror}"
        ) from exc
    return sockets


def _format_address(sock: socket.socket, scheme: str) -> str:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        return f"{scheme}://[{host}]:{port}"
    return f"{scheme}://{host}:{port}"
