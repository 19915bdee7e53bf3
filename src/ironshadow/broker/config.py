"""Broker limits and behaviour switches, each with its unit and the reason for its default."""

from __future__ import annotations

from dataclasses import dataclass

# What a persistent session does when its queue of undelivered messages is full.
QUEUE_FULL_DROP_NEW = "drop-new"
QUEUE_FULL_DROP_OLDEST = "drop-oldest"
QUEUE_FULL_POLICIES = (QUEUE_FULL_DROP_NEW, QUEUE_FULL_DROP_OLDEST)

# File descriptors kept free for listeners, store connections, log and data files.
FILE_DESCRIPTOR_RESERVE = 256

# Sources of the thing name in a verified client certificate: the subject's common name, or
# the first DNS or URI subject alternative name.
TLS_NAME_CN = "cn"
TLS_NAME_DNS = "dns"
TLS_NAME_URI = "uri"
TLS_NAME_FIELDS = (TLS_NAME_CN, TLS_NAME_DNS, TLS_NAME_URI)


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

    # Abuse limits (see ``limits``). A trip is counted per limit, under the field's name, and
    # logged at most once a minute per client or source address.
    # Connections open at once from one source address; more are closed when accepted, before
    # CONNECT is read. 0 means no limit, the default, because every device of `ironshadow
    # swarm` connects from 127.0.0.1 and a factory's devices often share one NAT address.
    max_connections_per_address: int = 0
    # CONNECT packets per second from one source address, as a token bucket with room for
    # connect_burst_per_address tokens (0: one second's worth, at least 1). A CONNECT over the
    # rate is rejected with CONNACK 0x9F (v5) or 3 (3.1.1). 0 means no limit, the default, for
    # the same reason: the devices behind one address reconnect together after an outage.
    connect_rate_per_address: float = 0.0
    connect_burst_per_address: int = 0
    # Subscriptions per client session; more get SUBACK 0x97 Quota exceeded. A device needs a
    # few (about eight per shadow) and an application that subscribes per thing needs one per
    # thing, which wildcards avoid. 10,000 bounds one client's share of the subscription index
    # to about 5 to 13 MB: 0.5 KB per plain and 1.3 KB per wildcard filter of 40 characters,
    # measured with tracemalloc on CPython 3.11. 0 means no limit.
    max_subscriptions: int = 10_000
    # PUBLISH packets per second per client, with publish_burst at once (0: one second's
    # worth, at least 1). Beyond it the broker holds the client's packets and stops reading its
    # socket until the rate allows more, so TCP slows that client down; nothing is dropped.
    # 0 means no limit, the default, because devices send legitimate bursts: a backlog after an
    # outage, or `ironshadow swarm` publishing flat out.
    max_publish_rate: float = 0.0
    publish_burst: int = 0
    # Levels of a topic name or filter, 1 to 512. A PUBLISH over it closes the connection (v5
    # DISCONNECT 0x90 Topic name invalid), a filter gets SUBACK 0x8F Topic filter invalid.
    # Shadow topics have at most 8 levels; 128 leaves room for deep topic hierarchies while the
    # recursive match of wildcard filters stays far from CPython's recursion limit (1000).
    max_topic_levels: int = 128
    # UTF-8 bytes of a topic name or filter, 1 to 65,535, with the same responses as above. The
    # longest shadow topic, with a 128-character thing name and a 64-character shadow name, has
    # 234 bytes. 1024 leaves four times that and bounds the filter text of a client with
    # max_subscriptions subscriptions to about 10 MB.
    max_topic_length: int = 1024

    # Topic filters that clients may not subscribe to (the SUBACK carries 0x80).
    deny_subscriptions: tuple[str, ...] = ()
    # Publish $SYS/broker/... statistics every this many seconds; 0 turns them off.
    sys_interval: float = 10.0
    retain_available: bool = True

    # The TLS listener opens on tls_port only when tls_cert and tls_key name the server's
    # certificate and private key (PEM files). With tls_ca, a PEM bundle of CA certificates,
    # every TLS client must present a certificate signed by one of them, and the thing name
    # comes from tls_name_field of that certificate (one of TLS_NAME_FIELDS).
    tls_port: int = 8883
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_name_field: str = TLS_NAME_CN
    # Seconds a TLS client may take to complete its handshake. It bounds how long a client
    # that stalls mid-handshake keeps a socket open, as connect_timeout does before CONNECT.
    tls_handshake_timeout: float = 10.0
