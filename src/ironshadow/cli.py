"""The ``ironshadow`` command."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import sqlite3
import ssl
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from . import __version__, swarm
from ._mypyc import compiled_build
from .api import ApiServer
from .api.cluster_reads import register_procedures
from .api.feed import FeedConfig
from .api.metrics import collect as collect_metrics
from .api.metrics import collect_websockets
from .api.security import HttpAuth
from .api.server import LISTEN_BACKLOG as HTTP_LISTEN_BACKLOG
from .api.server import bind_sockets
from .auth import AclError, AuthPolicy, UserStoreError
from .auth import command as auth_command
from .auth.tokens import DEFAULT_TOKEN_LIFETIME
from .broker.config import BrokerConfig
from .broker.core import default_max_connections
from .broker.tls import TLSConfigError, TLSListenerError
from .cluster import ClusterWorker, WorkerCountError, WorkerSpec, worker_data_dir
from .cluster.limits import create_table, needs_table, table_slots
from .cluster.reshard import prepare_data_dir
from .cluster.supervisor import Supervisor, auto_workers, bind_listener
from .engine import Engine, StorageConfig
from .settings import (
    SETTINGS,
    SettingsError,
    add_arguments,
    auth_settings,
    broker_config,
    check_storage,
    check_tls,
    feed_config,
    http_ssl_context,
    resolve,
    shadow_limits,
)
from .shadow import ShadowLimits
from .storage.base import StoreUnavailable

log = logging.getLogger("ironshadow")

# Result type of the bind functions that _bind calls: one socket or a list of them.
Bound = TypeVar("Bound")


def _raise_file_limit() -> None:
    """Raise the soft open-file limit to the hard limit: each connection needs a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)


def _warn_over_file_limits(max_connections: int, workers: int) -> None:
    """Warn when ``workers`` processes cannot hold ``max_connections`` connections within
    their open-file limits, so that the limit cannot be reached."""
    per_process = default_max_connections()
    if not max_connections or max_connections <= workers * per_process:
        return
    if workers == 1:
        capacity = f"one process may open at most {per_process} connections (its open-file limit)"
    else:
        capacity = (
            f"{workers} workers may open at most {workers * per_process} connections "
            f"({per_process} each, their open-file limit)"
        )
    try:
        advice = f"--workers 0 starts the {auto_workers(max_connections)} workers it needs"
    except ValueError as exc:
        advice = str(exc)  # too many workers: the message names what to change
    log.warning(
        "--max-connections %d cannot be reached: %s; %s", max_connections, capacity, advice
    )


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we test
        log.warning("uvloop is not installed; using the slower default asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class PortInUseError(Exception):
    """A listener's port is taken; the message names the port and the flag to change."""


async def _serve(
    config: BrokerConfig,
    limits: ShadowLimits,
    http_port: int,
    storage: StorageConfig | None,
    feed: FeedConfig,
    http_ssl: ssl.SSLContext | None = None,
    access: AuthPolicy | None = None,
    token_lifetime: float = DEFAULT_TOKEN_LIFETIME,
    worker: WorkerSpec | None = None,
) -> None:
    # Signal handlers first, so that a signal during start-up also stops the engine cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    engine = Engine(config, limits, storage)
    # With several workers, each serves the HTTP API on the sockets that the supervisor
    # bound. Requests for another worker's things, /metrics and the /ws feed reach the
    # other workers over the bus (cluster/worker.py). The app is built before the engine
    # starts, so that the peers' calls find it; it serves once the engine runs.
    http_auth = HttpAuth(access, token_lifetime) if access is not None else None
    api = ApiServer(
        engine,
        config.host,
        http_port,
        feed=feed,
        ssl_context=http_ssl,
        auth=http_auth,
        sockets=(
            [socket.socket(fileno=fd) for fd in worker.http_listen_fds]
            if worker is not None
            else None
        ),
    )
    cluster = ClusterWorker(engine, worker, stop.set) if worker is not None else None
    if cluster is not None:
        register_procedures(cluster, engine, api.app)
        # What this worker sends a peer's /metrics: its engine's and its HTTP endpoints'.
        cluster.metrics_source = partial(_own_metrics, engine, api)
        # SQLite history lives in each worker's folder; PostgreSQL is shared by all.
        cluster.history_per_worker = storage is not None and storage.postgres_dsn is None
        api.app.state.peer_metrics = cluster.gather_metrics
        api.app.state.peers = cluster
        api.app.state.feed.attach_listener = cluster.set_feed_listener
    if access is not None:
        access.attach(engine.broker)
        log.info("%s", access.describe_mode())
    try:
        if cluster is not None:
            await cluster.start()
        else:
            await engine.start()
    except TLSListenerError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _tls_port_in_use(config) from exc
        raise
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _mqtt_port_in_use(config) from exc
        raise
    try:
        await api.start()
    except OSError as exc:
        if cluster is not None:
            await cluster.stop()
        await engine.shutdown()
        if exc.errno == errno.EADDRINUSE:
            raise _http_port_in_use(config, http_port) from exc
        raise
    build = " (modules compiled with mypyc)" if compiled_build() else ""
    log.info("IronShadow %s running; stop with Ctrl-C or SIGTERM%s", __version__, build)
    await stop.wait()
    log.info("shutting down")
    if cluster is not None:
        cluster.stopping = True
    await api.stop()
    if cluster is not None:
        await cluster.stop()
    await engine.shutdown()
    if access is not None:
        access.close()


def _run_serve(args: argparse.Namespace) -> int:
    try:
        values = resolve(args)
        config = broker_config(values)
        limits = shadow_limits(values)
        feed = feed_config(values)
        check_storage(values)
        check_tls(values)
        http_ssl = http_ssl_context(values)
        auth = auth_settings(values)
    except SettingsError as exc:
        print(f"ironshadow: error: {exc}", file=sys.stderr)
        return 2
    worker = WorkerSpec.from_environment()
    try:
        workers = values["workers"] or auto_workers(values["max_connections"])
    except ValueError as exc:
        print(f"ironshadow: error: {exc}", file=sys.stderr)
        return 2
    if worker is not None:
        # Each worker admits its share of the engine's CONNECT rate. Its clients are spread
        # evenly by the hash of their ids, and a reconnect storm reaches every worker.
        config.connect_rate /= worker.workers
    role = f"worker-{worker.index} " if worker is not None else ""
    logging.basicConfig(
        level=values["log_level"],
        format=f"%(asctime)s %(levelname)s {role}%(name)s: %(message)s",
    )
    data_dir = Path(values["data_dir"])
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"ironshadow: error: cannot create data folder {data_dir}: {exc.strerror}; "
              "choose another with --data-dir", file=sys.stderr)
        return 2
    try:
        access = AuthPolicy(auth)
    except (UserStoreError, AclError) as exc:
        print(f"ironshadow: error: {exc}", file=sys.stderr)
        return 2
    if not len(access.users) and not access.anonymous_allowed:
        print(f"ironshadow: error: no users in {auth.users_file}, and --host {config.host} is "
              "not a loopback address, so any client could connect without a password; add a "
              "user with `ironshadow auth add NAME --role device|application|admin --data-dir "
              f"{data_dir}`, or pass --allow-anonymous to accept anonymous clients",
              file=sys.stderr)
        return 2
    # With several workers, each keeps its embedded stores and its MQTT state (retained
    # messages and persistent sessions) in a folder of its own under the data folder. Stores
    # left by another worker count are moved to their new owners first.
    if worker is None and not values["memory_only"]:
        try:
            prepare_data_dir(data_dir, workers)
        except (WorkerCountError, OSError, sqlite3.Error, StoreUnavailable) as exc:
            print(
                f"ironshadow: error: cannot move the stores in {data_dir} to --workers "
                f"{workers}: {exc}. The stores were left as they were; start with the "
                "previous --workers, or fix the cause and start again",
                file=sys.stderr,
            )
            return 2
    if worker is not None:
        data_dir = worker_data_dir(data_dir, worker.index)
        if not values["memory_only"]:
            data_dir.mkdir(exist_ok=True)
    storage = None
    if not values["memory_only"]:
        storage = StorageConfig(
            data_dir,
            redis_url=values["redis"] or None,
            postgres_dsn=values["postgres"] or None,
            retention_days=values["retention_days"],
            mqtt_state_in_data_dir=worker is not None,
        )
    _raise_file_limit()
    if worker is None:
        _warn_over_file_limits(config.max_connections, workers)
    _install_event_loop_policy()
    try:
        if worker is None and workers > 1:
            log.info("%s", access.describe_mode())
            access.close()
            return _supervise(args.argv, workers, config, values["http_port"])
        asyncio.run(
            _serve(
                config, limits, values["http_port"], storage, feed, http_ssl, access,
                values["token_lifetime"], worker,
            )
        )
    except (PortInUseError, StoreUnavailable, TLSConfigError) as exc:
        print(f"ironshadow: error: {exc}", file=sys.stderr)
        return 2
    except TLSListenerError as exc:
        # Caught before OSError below, whose messages name the plain MQTT and HTTP ports.
        print(f"ironshadow: error: {exc.strerror}; choose another port with --tls-port",
              file=sys.stderr)
        return 2
    except socket.gaierror as exc:
        print(f"ironshadow: error: cannot bind to host {config.host!r}: {exc.strerror}; "
              "give an IP address or a name of this machine with --host", file=sys.stderr)
        return 2
    except PermissionError:
        print(f"ironshadow: error: permission denied binding ports {config.port} and "
              f"{values['http_port']} on {config.host}; ports below 1024 need privileges, "
              "so choose higher ones with --mqtt-port and --http-port", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            print(f"ironshadow: error: cannot bind to address {config.host}: it is not an "
                  "address of this machine; choose another with --host", file=sys.stderr)
            return 2
        raise
    return 0


def _http_port_in_use(config: BrokerConfig, http_port: int) -> PortInUseError:
    return PortInUseError(
        f"HTTP port {http_port} on {config.host} is already in use; "
        "choose a free port with --http-port"
    )


def _tls_port_in_use(config: BrokerConfig) -> PortInUseError:
    return PortInUseError(
        f"MQTT TLS port {config.tls_port} on {config.host} is already in use; "
        "choose a free port with --tls-port"
    )


def _mqtt_port_in_use(config: BrokerConfig) -> PortInUseError:
    return PortInUseError(
        f"MQTT port {config.port} on {config.host} is already in use; "
        "choose a free port with --mqtt-port"
    )


def _own_metrics(engine: Engine, api: ApiServer) -> bytes:
    out = collect_metrics(engine)
    collect_websockets(out, api.app)
    return out.to_bytes()


def _bind(bind: Callable[[], Bound], in_use: Callable[[], PortInUseError]) -> Bound:
    """Return what ``bind()`` returns; a busy port raises ``in_use()`` instead."""
    try:
        return bind()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise in_use() from exc
        raise


def _supervise(argv: list[str], workers: int, config: BrokerConfig, http_port: int) -> int:
    """Bind the MQTT port, the TLS port and the HTTP port, and run ``workers`` copies of
    this command under a supervisor."""
    listener = _bind(
        lambda: bind_listener(config.host, config.port, config.listen_backlog),
        lambda: _mqtt_port_in_use(config),
    )
    tls_listener = None
    http_listeners: list[socket.socket] = []
    try:
        if config.tls_cert:
            # Every worker serves TLS on this socket. A TLS connection stays on the worker
            # that accepted it, because its TLS state cannot be passed on.
            tls_listener = _bind(
                lambda: bind_listener(config.host, config.tls_port, config.listen_backlog),
                lambda: _tls_port_in_use(config),
            )
        # Every worker serves HTTP too; a request or WebSocket stays where it landed.
        http_listeners = _bind(
            lambda: bind_sockets(config.host, http_port),
            lambda: _http_port_in_use(config, http_port),
        )
        for sock in http_listeners:
            # Listening now keeps connections made while the workers start in the queue.
            sock.listen(HTTP_LISTEN_BACKLOG)
            sock.set_inheritable(True)
    except BaseException:
        for sock in (listener, tls_listener, *http_listeners):
            if sock is not None:
                sock.close()
        raise
    log.info(
        "supervisor (pid %d) listening on %s:%d; starting %d workers",
        os.getpid(),
        config.host,
        listener.getsockname()[1],
        workers,
    )
    command = [sys.executable, "-m", "ironshadow", *argv]
    limits_table = None
    if needs_table(config):
        slots = table_slots(config, workers)
        limits_table = (create_table(workers, slots), slots)
    supervisor = Supervisor(command, workers, listener, tls_listener, http_listeners, limits_table)
    return supervisor.run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ironshadow", description="IronShadow: device shadows over MQTT for factories."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the engine: MQTT broker and device shadows",
        description="Run the engine: the MQTT broker, the shadow service and the REST API.",
        epilog="Every setting can also come from an IRONSHADOW_<SETTING> environment variable "
        "(for example IRONSHADOW_MQTT_PORT=1884) or from the TOML file given with --config "
        "(for example mqtt_port = 1884). A flag wins over the environment, which wins over "
        "the file.",
    )
    add_arguments(serve)
    serve.set_defaults(handler=_run_serve)
    swarm.add_command(commands)
    default_data_dir = next(setting.default for setting in SETTINGS if setting.name == "data_dir")
    auth_command.add_command(commands, default_data_dir)
    return parser


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # The supervisor of several workers starts each of them with the same arguments.
    args.argv = list(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
