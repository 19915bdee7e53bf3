"""Engine settings from three sources: a TOML file, the environment and command-line flags.

A flag wins over an ``IRONSHADOW_<NAME>`` environment variable, which wins over the TOML file
given with ``--config``, which wins over the default. One table (``SETTINGS``) describes each
setting once, so the three sources cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api.feed import FeedConfig
from .auth import AuthSettings, is_loopback
from .auth.tokens import DEFAULT_TOKEN_LIFETIME, parse_duration
from .broker import tls
from .broker.config import QUEUE_FULL_POLICIES, TLS_NAME_FIELDS, BrokerConfig
from .broker.limits import MAX_TOPIC_BYTES, MAX_TOPIC_LEVELS_CEILING
from .mqtt.constants import MAX_PACKET_SIZE
from .shadow import ShadowLimits

ENV_PREFIX = "IRONSHADOW_"


class SettingsError(ValueError):
    """An invalid setting: the message names the setting, the source and what to do."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # the TOML key; the flag is --name with dashes, the variable IRONSHADOW_NAME
    kind: Callable[[str], Any] | type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    is_list: bool = False
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _number_error(setting: Setting) -> str:
    if setting.kind is int:
        return "expected a whole number"
    return "expected a number"


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_defaults = BrokerConfig()
_feed_defaults = FeedConfig()

MAX_PORT = 65_535
# MQTT's own field limits: a two-byte integer for keep alive, Receive Maximum and Topic Alias
# Maximum, and the largest packet a variable byte integer can describe.
MAX_TWO_BYTE = 65_535
# The smallest packet size limit that still admits a CONNECT with a short client id and a
# few properties.
MIN_PACKET_SIZE = 128

SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "127.0.0.1", "address that the MQTT and HTTP listeners bind to"),
    Setting("mqtt_port", int, 1883, "TCP port of the MQTT listener", minimum=1, maximum=MAX_PORT),
    Setting("http_port", int, 8080,
            "TCP port of the HTTP API: REST, OpenAPI docs, the /ws feed and MQTT over WebSocket "
            "at /mqtt", minimum=1, maximum=MAX_PORT),
    Setting("tls_port", int, _defaults.tls_port,
            "TCP port of the MQTT TLS listener, which opens only when tls_cert and tls_key are "
            "set", minimum=1, maximum=MAX_PORT),
    Setting("tls_cert", str, _defaults.tls_cert,
            "PEM file of the server certificate; with tls_key it turns on MQTT over TLS on "
            "tls_port and HTTPS on http_port"),
    Setting("tls_key", str, _defaults.tls_key,
            "PEM file of the server certificate's private key, not encrypted"),
    Setting("tls_ca", str, _defaults.tls_ca,
            "PEM file of the CA certificates that sign client certificates; when set, every "
            "MQTT TLS client must present a certificate signed by one of them"),
    Setting("tls_name_field", str, _defaults.tls_name_field,
            "where the thing name of a client certificate comes from: cn is the subject's "
            "common name, dns and uri the first subject alternative name of that type",
            TLS_NAME_FIELDS),
    Setting("tls_handshake_timeout", float, _defaults.tls_handshake_timeout,
            "seconds a TLS client may take to complete its handshake", minimum=0.001),
    Setting("data_dir", str, "./data", "folder for the engine's local data; created if missing"),
    Setting("workers", int, 0,
            "engine processes that serve together as one engine, each using one CPU core; "
            "above 1, a supervisor starts them and restarts any that exits (see "
            "docs/workers.md). 0: one per CPU core, or more when --max-connections needs more "
            "processes' open files, up to 4 per core", minimum=0, maximum=1024),
    Setting("log_level", str, "INFO", "logging level", ("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("max_packet_size", int, _defaults.max_packet_size,
            "largest MQTT packet accepted from a client, in bytes",
            minimum=MIN_PACKET_SIZE, maximum=MAX_PACKET_SIZE),
    Setting("receive_maximum", int, _defaults.receive_maximum,
            "unacknowledged QoS 1 and 2 messages a v5 client may send at once",
            minimum=1, maximum=MAX_TWO_BYTE),
    Setting("max_inflight", int, _defaults.max_inflight_v311,
            "unacknowledged QoS 1 and 2 messages sent to an MQTT 3.1.1 client at once",
            minimum=1, maximum=MAX_TWO_BYTE),
    Setting("topic_alias_maximum", int, _defaults.topic_alias_maximum,
            "topic aliases a v5 client may use when publishing", minimum=0, maximum=MAX_TWO_BYTE),
    Setting("max_queued_messages", int, _defaults.max_queued_messages,
            "undelivered QoS 1 and 2 messages kept per session", minimum=0),
    Setting("queue_full_policy", str, _defaults.queue_full_policy,
            "what a full session queue drops", QUEUE_FULL_POLICIES),
    Setting("queue_qos0_offline", _bool, _defaults.queue_qos0_offline,
            "queue QoS 0 messages for offline persistent sessions too (true or false)"),
    Setting("max_keep_alive", int, _defaults.max_keep_alive,
            "largest keep alive granted to v5 clients, in seconds (0: no limit)",
            minimum=0, maximum=MAX_TWO_BYTE),
    Setting("max_connections", int, _defaults.max_connections,
            "connections held at once by the whole engine, all workers together; more are "
            "refused (0: each process's open-file limit less 256)",
            minimum=0),
    Setting("connect_rate", float, _defaults.connect_rate,
            "CONNECT packets processed per second by the whole engine, each worker taking "
            "its share; the rest wait their turn (0: no limit)",
            minimum=0),
    Setting("connect_timeout", float, _defaults.connect_timeout,
            "seconds a new connection may take to send CONNECT", minimum=0.001),
    Setting("listen_backlog", int, _defaults.listen_backlog,
            "length of the kernel's accept queue (capped by net.core.somaxconn)", minimum=1),
    Setting("max_connections_per_address", int, _defaults.max_connections_per_address,
            "connections open at once from one source address, counted over all workers; more "
            "are closed when accepted (0: no limit)", minimum=0),
    Setting("connect_rate_per_address", float, _defaults.connect_rate_per_address,
            "CONNECT packets per second accepted from one source address by all workers "
            "together; more are rejected with 'connection rate exceeded' (0: no limit)",
            minimum=0),
    Setting("connect_burst_per_address", int, _defaults.connect_burst_per_address,
            "CONNECT packets one source address may send at once before "
            "connect_rate_per_address applies (0: one second's worth)", minimum=0),
    Setting("max_subscriptions", int, _defaults.max_subscriptions,
            "subscriptions per client; more get 'quota exceeded' in SUBACK (0: no limit)",
            minimum=0),
    Setting("max_publish_rate", float, _defaults.max_publish_rate,
            "PUBLISH packets per second per client; a faster client is slowed down by "
            "pausing reads from its socket, and nothing is dropped (0: no limit)", minimum=0),
    Setting("publish_burst", int, _defaults.publish_burst,
            "PUBLISH packets a client may send at once before max_publish_rate applies "
            "(0: one second's worth)", minimum=0),
    Setting("max_topic_levels", int, _defaults.max_topic_levels,
            "levels in a topic name or topic filter; a PUBLISH over it closes the connection, "
            "a subscription over it is rejected", minimum=1, maximum=MAX_TOPIC_LEVELS_CEILING),
    Setting("max_topic_length", int, _defaults.max_topic_length,
            "UTF-8 bytes in a topic name or topic filter; a PUBLISH over it closes the "
            "connection, a subscription over it is rejected", minimum=1, maximum=MAX_TOPIC_BYTES),
    Setting("write_high_water", int, _defaults.write_high_water,
            "bytes buffered for one client above which QoS 0 messages to it are dropped",
            minimum=1),
    Setting("write_low_water", int, _defaults.write_low_water,
            "bytes buffered for one client below which sending resumes", minimum=0),
    Setting("deny_subscription", str, (), "topic filter that clients may not subscribe to "
            "(repeat the flag for several)", is_list=True),
    Setting("allow_anonymous", _bool, False,
            "admit clients without a password while the data folder has no users, even when "
            "a listener is not on a loopback address (true or false; the flag alone is true)"),
    Setting("acl_file", str, "", "TOML file of further topic rules for device and application "
            "users (see docs/auth.md); reread when it changes"),
    Setting("device_topic", str, (), "topic pattern that every device user may publish and "
            "subscribe to, besides $aws/things/{username}/#; {username} and {client_id} are "
            "filled in (repeat the flag for several)", is_list=True),
    Setting("application_topic", str, (), "topic pattern that every application user may "
            "publish and subscribe to, besides every shadow topic; {username} and {client_id} "
            "are filled in (repeat the flag for several)", is_list=True),
    Setting("sys_interval", float, _defaults.sys_interval,
            "seconds between $SYS/broker statistics updates (0: off)", minimum=0),
    Setting("redis", str, "", "Redis URL for the shadows (redis://host:port/db); empty keeps "
            "them in the data folder"),
    Setting("postgres", str, "", "PostgreSQL URL for the history (postgresql://user@host/db); "
            "empty keeps it in SQLite in the data folder"),
    Setting("retention_days", float, 30.0, "days of history kept", minimum=0.001),
    Setting("memory_only", _bool, False,
            "keep shadows, retained messages and sessions in memory only, with no store and "
            "no history, so a restart loses them (true or false)"),
    Setting("max_shadow_size", int, 8192,
            "largest shadow state (desired plus reported, as compact JSON) in bytes", minimum=1),
    Setting("ws_feed_rate", float, _feed_defaults.rate,
            "frames per second that a /ws feed client gets for one shadow; changes in between "
            "are coalesced and the latest is always sent (0: every change)", minimum=0),
    Setting("ws_feed_queue", int, _feed_defaults.max_queue,
            "frames that may wait for one /ws feed client, at most one per shadow; a client "
            "with more is disconnected", minimum=1),
    Setting("token_lifetime", parse_duration, DEFAULT_TOKEN_LIFETIME,
            "how long a token from POST /auth/token or a dashboard sign-in is valid: seconds, "
            "or a number with a unit s, m, h or d, such as 90m or 12h", minimum=1),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every setting; unset flags stay None so lower sources apply."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    for setting in SETTINGS:
        metavar = setting.name.upper()
        if setting.is_list:
            parser.add_argument(setting.flag, action="append", default=None, metavar=metavar,
                                help=setting.help)
        else:
            choices = f"; one of {', '.join(setting.choices)}" if setting.choices else ""
            default = setting.default
            if default == "":
                default = "none"
            elif isinstance(default, bool):
                default = str(default).lower()
            # A true-or-false flag given alone means true, as in --allow-anonymous.
            alone = {"nargs": "?", "const": "true"} if setting.kind is _bool else {}
            parser.add_argument(setting.flag, default=None, metavar=metavar,
                                help=f"{setting.help}{choices} (default: {default})", **alone)


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    try:
        if setting.is_list:
            items = raw if isinstance(raw, list) else [i for i in str(raw).split(",") if i]
            return tuple(str(item) for item in items)
        if isinstance(raw, str) or setting.kind is _bool:
            value = setting.kind(raw) if isinstance(raw, str) else _bool(str(raw))
        elif setting.kind is int and (not isinstance(raw, int) or isinstance(raw, bool)):
            raise ValueError("expected a whole number")
        else:
            value = setting.kind(raw)
    except (TypeError, ValueError) as exc:
        reason = _number_error(setting) if setting.kind in (int, float) else str(exc)
        raise SettingsError(
            f"invalid value {raw!r} for {setting.name} in {source}: {reason}"
        ) from None
    if setting.choices and value not in setting.choices:
        raise SettingsError(
            f"invalid value {raw!r} for {setting.name} in {source}: "
            f"choose one of {', '.join(setting.choices)}"
        )
    if setting.kind is float and value != value:  # NaN passes every comparison below
        raise SettingsError(f"invalid value {raw!r} for {setting.name} in {source}: not a number")
    too_low = setting.minimum is not None and value < setting.minimum
    too_high = setting.maximum is not None and value > setting.maximum
    if too_low or too_high:
        raise SettingsError(
            f"invalid value {raw!r} for {setting.name} in {source}: {_range_text(setting)}"
        )
    return value


def _range_text(setting: Setting) -> str:
    if setting.maximum is None:
        return f"must be at least {setting.minimum:,}"
    return f"must be from {setting.minimum:,} to {setting.maximum:,}"


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Merge defaults, the TOML file, the environment and the flags, in that order."""
    environ = os.environ if environ is None else environ
    values = {setting.name: setting.default for setting in SETTINGS}
    config_file = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError:
            raise SettingsError(f"config file {path} not found") from None
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
        for key, raw in document.items():
            name = key.replace("-", "_")
            setting = _BY_NAME.get(name)
            if setting is None:
                raise SettingsError(
                    f"unknown setting {key!r} in {path}; known settings: "
                    + ", ".join(sorted(_BY_NAME))
                )
            values[name] = _convert(setting, raw, str(path))
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        if raw is not None:
            values[setting.name] = _convert(setting, raw, f"environment variable {setting.env}")
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None)
        if raw is not None:
            values[setting.name] = _convert(setting, raw, f"flag {setting.flag}")
    return values


def shadow_limits(values: Mapping[str, Any]) -> ShadowLimits:
    """Build the shadow document limits from resolved settings."""
    if values["max_shadow_size"] < 1:
        raise SettingsError(
            f"max_shadow_size must be at least 1 byte, got {values['max_shadow_size']}"
        )
    return ShadowLimits(max_state_bytes=values["max_shadow_size"])


def check_storage(values: Mapping[str, Any]) -> None:
    """Reject store settings that --memory-only would silently ignore."""
    if values["memory_only"] and (values["redis"] or values["postgres"]):
        raise SettingsError(
            "memory_only is set together with redis or postgres, which it would ignore; "
            "remove one or the other"
        )


def feed_config(values: Mapping[str, Any]) -> FeedConfig:
    """Build the /ws feed's limits from resolved settings."""
    return FeedConfig(rate=values["ws_feed_rate"], max_queue=values["ws_feed_queue"])


def _check_bursts(values: Mapping[str, Any]) -> None:
    """Reject a burst whose rate is off, because the broker would ignore it."""
    for burst, rate in (
        ("connect_burst_per_address", "connect_rate_per_address"),
        ("publish_burst", "max_publish_rate"),
    ):
        if values[burst] and not values[rate]:
            raise SettingsError(
                f"{burst} is {values[burst]} but {rate} is 0 (no limit), so the burst would "
                f"have no effect; set {rate} too, or remove {burst}"
            )


def broker_config(values: Mapping[str, Any]) -> BrokerConfig:
    """Build the broker's configuration from resolved settings."""
    _check_bursts(values)
    if values["write_low_water"] > values["write_high_water"]:
        raise SettingsError(
            f"write_low_water ({values['write_low_water']}) must not exceed "
            f"write_high_water ({values['write_high_water']})"
        )
    return BrokerConfig(
        host=values["host"],
        port=values["mqtt_port"],
        max_packet_size=values["max_packet_size"],
        receive_maximum=values["receive_maximum"],
        max_inflight_v311=values["max_inflight"],
        topic_alias_maximum=values["topic_alias_maximum"],
        max_queued_messages=values["max_queued_messages"],
        queue_full_policy=values["queue_full_policy"],
        queue_qos0_offline=values["queue_qos0_offline"],
        write_high_water=values["write_high_water"],
        write_low_water=values["write_low_water"],
        max_keep_alive=values["max_keep_alive"],
        connect_timeout=values["connect_timeout"],
        max_connections=values["max_connections"],
        connect_rate=values["connect_rate"],
        listen_backlog=values["listen_backlog"],
        max_connections_per_address=values["max_connections_per_address"],
        connect_rate_per_address=values["connect_rate_per_address"],
        connect_burst_per_address=values["connect_burst_per_address"],
        max_subscriptions=values["max_subscriptions"],
        max_publish_rate=values["max_publish_rate"],
        publish_burst=values["publish_burst"],
        max_topic_levels=values["max_topic_levels"],
        max_topic_length=values["max_topic_length"],
        deny_subscriptions=values["deny_subscription"],
        sys_interval=values["sys_interval"],
        tls_port=values["tls_port"],
        tls_cert=values["tls_cert"],
        tls_key=values["tls_key"],
        tls_ca=values["tls_ca"],
        tls_name_field=values["tls_name_field"],
        tls_handshake_timeout=values["tls_handshake_timeout"],
    )


def check_tls(values: Mapping[str, Any]) -> None:
    """Check the TLS files and ports, so that a bad one stops the start-up with a clear error."""
    if not (values["tls_cert"] or values["tls_key"] or values["tls_ca"]):
        return
    try:
        tls.server_context(values["tls_cert"], values["tls_key"], values["tls_ca"])
    except tls.TLSConfigError as exc:
        raise SettingsError(str(exc)) from None
    for other in ("mqtt_port", "http_port"):
        if values["tls_port"] == values[other]:
            raise SettingsError(
                f"tls_port and {other} are both {values['tls_port']}. Give the TLS listener "
                "a port of its own with tls_port"
            )


def http_ssl_context(values: Mapping[str, Any]) -> ssl.SSLContext | None:
    """Build the HTTPS context of the API from tls_cert and tls_key, or return None without them.

    The API does not request client certificates, even with tls_ca set.
    """
    if not values["tls_cert"]:
        return None
    try:
        return tls.server_context(values["tls_cert"], values["tls_key"])
    except tls.TLSConfigError as exc:
        raise SettingsError(str(exc)) from None


def auth_settings(values: Mapping[str, Any]) -> AuthSettings:
    """Build the MQTT authentication settings from resolved settings.

    Every listener (MQTT, MQTT over TLS and the HTTP API with its MQTT over WebSocket
    endpoint) binds to ``host``, so that one address decides whether all are on loopback.
    """
    return AuthSettings(
        data_dir=Path(values["data_dir"]),
        acl_file=Path(values["acl_file"]) if values["acl_file"] else None,
        allow_anonymous=values["allow_anonymous"],
        loopback_only=is_loopback(values["host"]),
        device_topics=values["device_topic"],
        application_topics=values["application_topic"],
    )
