"""Broker limits and behaviour switches, each with its unit and the reason for its default."""

from __future__ import annotations

from dataclasses import dataclass

# What a persistent session does when its queue of undelivered messages is full.
QUEUE_FULL_DROP_NEW = "drop-new"
QUEUE_FULL_DROP_OLDEST = "drop-oldest"
QUEUE_FULL_POLICIES = (QUEUE_FULL_DROP_NEW, QUEUE_FULL_DROP_OLDEST)

# File descriptors kept free for listeners, store connections, log and data files.
FILE_DESCRIPTOR_RESERVE = 256


@dataclass(slots=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883

    # Largest packet accepted from a client, in bytes. 1 MiB is plenty for telemetry and
    # shadow documents while keeping one connection's decode buffer small.
    max_packet_size: int = 1_048_576

    # Receive Maximum that the broker announces: QoS 1 and 2 PUBLISH packets a client may
    # have unacknowledged at once. It bounds the work one client can queue.
    receive_maximum: int = 100
    # In-flight window towards an MQTT 3.1.1 client, which cannot announce its own.
    max_inflight_v311: int = 20
    # Topic aliases a v5 client may use towards the broker (Topic Alias Maximum).
    topic_alias_maximum: int = 10

    # Undelivered QoS 1 and 2 messages kept per session, connected or not, and the
    # policy when the bound is reached.
    max_queued_messages: int = 1000
    queue_full_policy: str = QUEUE_FULL_DROP_NEW
    # Offline persistent sessions also queue QoS 0 messages when this is true.
    queue_qos0_offline: bool = False

    # Outbound buffering per connection, in bytes: above the high mark the broker stops
    # writing QoS 0 to that client (and counts the drops) and queues QoS 1 and 2 in the
    # session; below the low mark it resumes.
    write_high_water: int = 256 * 1024
    write_low_water: int = 64 * 1024

    # Largest keep alive accepted, in seconds; 0 leaves the client's value. A v5 client that
    # requests more gets the maximum back in Server Keep Alive.
    max_keep_alive: int = 0
    # Upper bound on the session expiry interval a client may ask for, in seconds.
    max_session_expiry: int = 0xFFFFFFFF

    # Admission control for reconnect storms.
    # Seconds a new socket may stay open without completing CONNECT.
    connect_timeout: float = 10.0
    # Connections held at once; more are refused. 0 derives the limit from the process's
    # open-file limit (RLIMIT_NOFILE) less FILE_DESCRIPTOR_RESERVE, because accept() fails
    # with EMFILE past it and the broker could no longer open its own files.
    max_connections: int = 0
    # CONNECT packets processed per second across the broker; the rest wait in the
    # admission queue. 0 means no limit.
    connect_rate: float = 0.0
    # listen() backlog; the kernel caps it at net.core.somaxconn.
    listen_backlog: int = 4096

    # Topic filters that clients may not subscribe to (the SUBACK carries 0x80).
    deny_subscriptions: tuple[str, ...] = ()
    # Publish $SYS/broker/... statistics every this many seconds; 0 turns them off.
    sys_interval: float = 10.0
    retain_available: bool = True
