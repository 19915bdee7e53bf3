"""The shadow feed at ``/ws``: shadow changes as JSON text messages, for dashboards.

A client subscribes to thing names and prefix patterns, and receives a frame for each change
of a matching shadow. docs/websocket.md describes the protocol for client authors.

Requests are text messages holding a JSON object with a ``subscribe`` list, an
``unsubscribe`` list or both (unsubscribe is applied first). Each entry is a thing name, a
prefix pattern (the start of a thing name followed by ``*``) or ``*`` alone for every thing.
A request is applied whole or not at all, and the reply is ``{"subscriptions": [...]}`` with
the client's subscriptions after it, or ``{"error": "..."}``. A client that authenticated
as a device (api/security.py) may subscribe only to its own thing name.

A change frame is ``{"thing", "shadow", "version", "deleted", "state", "timestamp"}``, with
``shadow`` null for the classic shadow, ``state`` the shadow's ``desired``, ``reported`` and
``delta`` sections that are not empty (null after a delete) and ``timestamp`` the epoch
seconds of the change. Changes come from the shadow service once they are durable.

Coalescing. Each client gets at most ``rate`` frames per second for each shadow (a thing's
classic shadow and each named shadow count apart). The first change after a quiet interval
is sent at once. The changes during the next ``1 / rate`` seconds are held, and at the end
of the interval only the latest is sent, so the latest state always arrives.

Slow clients. Frames wait per client, at most one per shadow, because a newer change
replaces a waiting frame of the same shadow. A client with more than ``max_queue`` frames
waiting (requests' replies included) is closed with code 1008 and logged once. Nothing here
waits for a client: frames are handed over by a task per client, so a stalled client never
slows the engine.

Cost. While no client subscribes, the shadow service does not even collect its changes
(``ShadowService.change_listener`` is None). A change looks up its thing name in a dict and
each distinct prefix length in another, and its frame is serialised once for all clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from ..broker.access import ROLE_DEVICE
from ..engine.service import ChangeListener, ShadowChange, ShadowService
from ..shadow import ShadowError, shadow_key, validate_thing_name
from ..shadow.delta import compute_delta

log = logging.getLogger("ironshadow.api")

FEED_PATH = "/ws"
# The key of the ASGI scope's "state" under which api/security.py puts the caller's token
# claims when authentication is on.
CLAIMS_STATE_KEY = "token_claims"

# Subscriptions that one client may have at once. It bounds the memory and the matching work
# that one client can cause. A dashboard that needs more subscribes to prefix patterns.
MAX_SUBSCRIPTIONS = 1000
# Seconds that a dropped client has to take its close frame before the handler gives up
# and leaves the socket to uvicorn.
# NOTE: uvicorn then closes the transport, which first tries to send what its buffer holds,
# so the socket of a peer that never reads again may stay open until that peer goes away.
CLOSE_TIMEOUT = 10.0
# Timer resolution, in seconds: frames held until within this much of their due time are
# sent together, so that a burst of changes costs one timer callback.
TIMER_SLACK = 0.005

# WebSocket close codes (RFC 6455, section 7.4.1).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008

WILDCARD = "*"
REQUEST_HELP = (
    'send {"subscribe": [...]} or {"unsubscribe": [...]} with thing names and prefix '
    "patterns such as \"line-2*\""
)


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """Limits of the shadow feed; the settings ``ws_feed_rate`` and ``ws_feed_queue``."""

    # Frames per second for each shadow and client, or 0 to send every change. Four a second
    # is as fast as a person follows a changing number on a dashboard.
    rate: float = 4.0
    # Frames that may wait for one client, and one more drops the client. At most one frame
    # per shadow waits, so this is also the number of busy shadows that a client can follow
    # while it reads more slowly than they change. 10,000 frames of AWS's largest shadow
    # state (8 KB) are about 80 MB.
    max_queue: int = 10_000

    def __post_init__(self) -> None:
        if not self.rate >= 0:
            raise ValueError(f"FeedConfig.rate must be 0 or more, got {self.rate!r}")
        if self.max_queue < 1:
            raise ValueError(f"FeedConfig.max_queue must be at least 1, got {self.max_queue!r}")


class Frame:
    """One change, serialised on first use and then shared by every client that sends it."""

    __slots__ = ("_text", "change")

    def __init__(self, change: ShadowChange) -> None:
        self.change = change
        self._text: str | None = None

    def text(self) -> str:
        if self._text is None:
            self._text = encode_change(self.change)
        return self._text


def encode_change(change: ShadowChange) -> str:
    """Serialise a change as the feed's JSON frame."""
    shadow = change.shadow
    state: dict[str, Any] | None = None
    if not shadow.deleted:
        state = shadow.state()
        if shadow.has_delta:
            state["delta"] = compute_delta(state.get("desired") or {}, state.get("reported"))
    document = {
        "thing": change.thing,
        "shadow": change.shadow_name,
        "version": shadow.version,
        "deleted": shadow.deleted,
        "state": state,
        "timestamp": change.timestamp,
    }
    return orjson.dumps(document).decode()


class FeedClient:
    """One connected feed client: its subscriptions and the frames waiting for it."""

    __slots__ = (
        "close_code",
        "close_reason",
        "closed",
        "done",
        "frames_sent",
        "held",
        "identity",
        "last_sent",
        "only_thing",
        "peer",
        "prefixes",
        "ready",
        "replies",
        "things",
        "wakeup",
        "websocket",
    )

    def __init__(
        self, websocket: WebSocket, identity: Any = None, only_thing: str | None = None
    ) -> None:
        self.websocket = websocket
        # Who the client authenticated as (api/security.py), or None when anonymous.
        self.identity = identity
        # The one thing the client may subscribe to (a device's own), or None for any.
        self.only_thing = only_thing
        client = websocket.client
        self.peer = f"{client.host}:{client.port}" if client is not None else "(unknown)"
        self.things: set[str] = set()
        self.prefixes: set[str] = set()
        # Frames to send now, by shadow key, in the order they became due.
        self.ready: dict[str, Frame] = {}
        # Frames held back by the rate, by shadow key, until their interval ends.
        self.held: dict[str, Frame] = {}
        # Shadow key -> loop time of its last frame, oldest first. Entries older than the
        # interval are pruned: they would no longer hold a change back.
        self.last_sent: dict[str, float] = {}
        self.replies: list[str] = []
        self.frames_sent = 0
        self.wakeup = asyncio.Event()
        self.done = asyncio.Event()
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""

    @property
    def subscriptions(self) -> list[str]:
        return sorted([*self.things, *(prefix + WILDCARD for prefix in self.prefixes)])

    @property
    def waiting(self) -> int:
        """Frames and replies not yet handed to the WebSocket."""
        return len(self.ready) + len(self.held) + len(self.replies)

    def matches(self, thing: str) -> bool:
        return thing in self.things or any(thing.startswith(p) for p in self.prefixes)


class ShadowFeed:
    """The ``/ws`` endpoint: its clients, their subscriptions and the coalescing timer."""

    def __init__(self, service: ShadowService, config: FeedConfig | None = None) -> None:
        self.service = service
        self.config = config or FeedConfig()
        self.interval = 1.0 / self.config.rate if self.config.rate else 0.0
        # Clients connected and not dropped.
        self.clients: set[FeedClient] = set()
        # Connections whose handler has not returned yet, dropped clients included.
        self._handlers = 0
        # Thing name -> clients subscribed to it by name.
        self._by_thing: dict[str, set[FeedClient]] = {}
        # Prefix -> clients subscribed to it. The empty prefix is the "*" subscription.
        self._by_prefix: dict[str, set[FeedClient]] = {}
        self._prefix_lengths: list[int] = []
        # (due time, sequence, client, shadow key) of each held frame, earliest first.
        self._due: list[tuple[float, int, FeedClient, str]] = []
        self._sequence = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self.frames_sent = 0
        self.clients_dropped = 0
        # Called after each client joins ``clients``; api/security.py starts its checks here.
        self.client_added: Callable[[], None] | None = None
        # Called with the feed's listener for stored shadow changes when the first
        # subscription is made, and with None when the last one ends. By default it sets the
        # shadow service's change listener; a cluster worker also requests its peers' changes.
        self.attach_listener: Callable[[ChangeListener | None], None] = self._attach
        self._listening = False

    # --- changes from the shadow service ------------------------------------------------

    def _on_changes(self, changes: list[ShadowChange]) -> None:
        # The shadow service calls this after it has acknowledged the batch, so an error here
        # must not reach it. The error is logged, and the batch's frames are lost.
        try:
            self._fan_out(changes)
        except Exception:
            log.exception("the shadow feed failed to handle %d changes", len(changes))

    def _fan_out(self, changes: list[ShadowChange]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        by_thing = self._by_thing
        for change in changes:
            thing = change.thing
            clients = by_thing.get(thing)
            if self._prefix_lengths:
                clients = self._add_prefix_matches(thing, clients)
            if not clients:
                continue
            frame = Frame(change)
            key = shadow_key(thing, change.shadow_name)
            slow = [client for client in clients if not self._offer(client, key, frame, now)]
            # Dropped after the loop, because dropping changes the sets it iterates.
            for client in slow:
                self._drop_slow(client)
        self._schedule_timer(loop)

    def _add_prefix_matches(
        self, thing: str, clients: set[FeedClient] | None
    ) -> set[FeedClient] | None:
        by_prefix = self._by_prefix
        for length in self._prefix_lengths:
            if length > len(thing):
                break
            matched = by_prefix.get(thing[:length])
            if matched:
                # A client subscribed by name and by prefix gets one frame.
                clients = matched if clients is None else clients | matched
        return clients

    def _offer(self, client: FeedClient, key: str, frame: Frame, now: float) -> bool:
        """Queue ``frame`` for ``client``; return False if the client has too many waiting."""
        if key in client.ready:
            client.ready[key] = frame
            return True
        if key in client.held:
            client.held[key] = frame
            return True
        last = client.last_sent.get(key)
        if last is not None and now - last < self.interval:
            client.held[key] = frame
            self._sequence += 1
            heapq.heappush(self._due, (last + self.interval, self._sequence, client, key))
        else:
            self._make_ready(client, key, frame, now)
        return client.waiting <= self.config.max_queue

    def _make_ready(self, client: FeedClient, key: str, frame: Frame, now: float) -> None:
        client.ready[key] = frame
        client.wakeup.set()
        if not self.interval:
            return
        last_sent = client.last_sent
        last_sent.pop(key, None)
        last_sent[key] = now
        # Entries are in time order, so the stale ones are at the front. Removing up to two
        # for each one added shrinks them after a burst; the entry just added stops the loop.
        horizon = now - self.interval
        for _ in range(2):
            oldest = next(iter(last_sent))
            if last_sent[oldest] > horizon:
                break
            del last_sent[oldest]

    def _schedule_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._due:
            return
        due = self._due[0][0]
        if self._timer is not None:
            if self._timer_due <= due + TIMER_SLACK:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = loop.call_at(due, self._release_held)

    def _release_held(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._due
        while due and due[0][0] <= now + TIMER_SLACK:
            _, _, client, key = heapq.heappop(due)
            frame = client.held.pop(key, None)
            if frame is not None and not client.closed:
                self._make_ready(client, key, frame, now)
        self._schedule_timer(loop)

    # --- subscriptions ------------------------------------------------------------------

    def _handle_request(self, client: FeedClient, text: str) -> dict[str, Any]:
        """Apply one request and return the reply document."""
        try:
            request = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return {"error": f"invalid JSON: {exc}; {REQUEST_HELP}"}
        if type(request) is not dict or not request:
            return {"error": f"a request must be a JSON object; {REQUEST_HELP}"}
        unknown = sorted(set(request) - {"subscribe", "unsubscribe"})
        if unknown:
            return {"error": f"unknown request member {unknown[0]!r}; {REQUEST_HELP}"}
        lists: dict[str, list[str]] = {}
        for action in ("unsubscribe", "subscribe"):
            entries = request.get(action)
            if entries is None:
                continue
            if type(entries) is not list or not all(type(entry) is str for entry in entries):
                return {"error": f"{action!r} must be a list of strings; {REQUEST_HELP}"}
            for entry in entries:
                error = check_subscription(entry)
                if error is None and action == "subscribe":
                    error = _check_allowed(client, entry)
                if error is not None:
                    return {"error": error}
            lists[action] = entries
        removed = set(lists.get("unsubscribe", ()))
        current = set(client.subscriptions)
        total = len((current - removed) | set(lists.get("subscribe", ())))
        if total > MAX_SUBSCRIPTIONS:
            return {
                "error": f"too many subscriptions: {total}, the maximum is {MAX_SUBSCRIPTIONS}; "
                "subscribe to prefix patterns instead of many thing names"
            }
        self._unsubscribe(client, removed)
        self._subscribe(client, lists.get("subscribe", ()))
        return {"subscriptions": client.subscriptions}

    def _subscribe(self, client: FeedClient, entries: Iterable[str]) -> None:
        for entry in entries:
            if entry.endswith(WILDCARD):
                prefix = entry[:-1]
                client.prefixes.add(prefix)
                self._by_prefix.setdefault(prefix, set()).add(client)
            else:
                client.things.add(entry)
                self._by_thing.setdefault(entry, set()).add(client)
        self._index_changed()

    def _unsubscribe(self, client: FeedClient, entries: Iterable[str]) -> None:
        for entry in entries:
            if entry.endswith(WILDCARD):
                prefix = entry[:-1]
                client.prefixes.discard(prefix)
                _discard(self._by_prefix, prefix, client)
            else:
                client.things.discard(entry)
                _discard(self._by_thing, entry, client)
        # Frames of things that the client no longer follows are not sent.
        for frames in (client.ready, client.held):
            unfollowed = [
                key for key, frame in frames.items() if not client.matches(frame.change.thing)
            ]
            for key in unfollowed:
                del frames[key]
        self._index_changed()

    def _index_changed(self) -> None:
        self._prefix_lengths = sorted({len(prefix) for prefix in self._by_prefix})
        listening = bool(self._by_thing or self._by_prefix)
        if listening != self._listening:
            self._listening = listening
            self.attach_listener(self._on_changes if listening else None)

    def _attach(self, listener: ChangeListener | None) -> None:
        self.service.change_listener = listener

    def _forget(self, client: FeedClient) -> None:
        """Remove the client with its subscriptions and waiting frames."""
        client.closed = True
        self.clients.discard(client)
        client.ready.clear()
        client.held.clear()
        client.replies.clear()
        client.last_sent.clear()
        self._unsubscribe(client, client.subscriptions)
        client.done.set()

    def _drop_slow(self, client: FeedClient) -> None:
        waiting = client.waiting
        self.clients_dropped += 1
        log.warning(
            "feed client %s dropped: %d frames waiting, the maximum is %d (ws_feed_queue); "
            "closing with code %d",
            client.peer,
            waiting,
            self.config.max_queue,
            CLOSE_POLICY_VIOLATION,
        )
        client.close_code = CLOSE_POLICY_VIOLATION
        client.close_reason = f"too slow: more than {self.config.max_queue} frames waiting"
        self._forget(client)

    def close_clients(self, reason_for: Callable[[Any], str | None]) -> None:
        """Close with 1008 every client for whose ``identity`` ``reason_for`` gives a reason."""
        for client in list(self.clients):
            reason = reason_for(client.identity)
            if reason is not None and not client.closed:
                log.info("feed client %s closed: %s", client.peer, reason)
                client.close_code = CLOSE_POLICY_VIOLATION
                # A close frame's reason is at most 123 bytes of UTF-8.
                client.close_reason = reason.encode()[:123].decode(errors="ignore")
                self._forget(client)

    # --- connections --------------------------------------------------------------------

    async def serve(
        self, websocket: WebSocket, identity: Any = None, only_thing: str | None = None
    ) -> None:
        """Serve one client from the accepted handshake to the close.

        ``identity`` is kept for ``close_clients()``; with ``only_thing`` the client may
        subscribe to that thing name only.
        """
        await websocket.accept()
        client = FeedClient(websocket, identity, only_thing)
        self.clients.add(client)
        if self.client_added is not None:
            self.client_added()
        self._handlers += 1
        self._all_closed.clear()
        loop = asyncio.get_running_loop()
        receiver = loop.create_task(self._receive_loop(client))
        sender = loop.create_task(self._send_loop(client))
        try:
            await client.done.wait()
        finally:
            if not client.closed:
                self._forget(client)
            receiver.cancel()
            sender.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
            try:
                if client.close_code is not None:
                    with contextlib.suppress(
                        TimeoutError, WebSocketDisconnect, WebSocketDisconnected, OSError
                    ):
                        await asyncio.wait_for(
                            websocket.close(client.close_code, client.close_reason),
                            CLOSE_TIMEOUT,
                        )
            finally:
                self._handlers -= 1
                if not self._handlers:
                    self._all_closed.set()

    async def _receive_loop(self, client: FeedClient) -> None:
        websocket = client.websocket
        try:
            while not client.closed:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    log.info("feed client %s sent a binary message; closing", client.peer)
                    client.close_code = CLOSE_UNSUPPORTED_DATA
                    client.close_reason = "requests must be JSON text messages"
                    break
                reply = self._handle_request(client, text)
                client.replies.append(orjson.dumps(reply).decode())
                client.wakeup.set()
                if client.waiting > self.config.max_queue:
                    self._drop_slow(client)
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass
        if not client.closed:
            self._forget(client)

    async def _send_loop(self, client: FeedClient) -> None:
        websocket = client.websocket
        try:
            while not client.closed:
                if client.replies:
                    text = client.replies.pop(0)
                elif client.ready:
                    key = next(iter(client.ready))
                    text = client.ready.pop(key).text()
                    client.frames_sent += 1
                    self.frames_sent += 1
                else:
                    client.wakeup.clear()
                    await client.wakeup.wait()
                    continue
                await websocket.send({"type": "websocket.send", "text": text})
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass
        if not client.closed:
            self._forget(client)

    async def close_all(self, timeout: float) -> None:
        """Close every client with 1001 (going away), waiting up to ``timeout`` seconds."""
        for client in list(self.clients):
            if not client.closed:
                client.close_code = CLOSE_GOING_AWAY
                client.close_reason = "server shutting down"
                self._forget(client)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), timeout)


def check_subscription(entry: str) -> str | None:
    """Return why ``entry`` is not a thing name, prefix pattern or "*", or None if it is."""
    if entry == WILDCARD:
        return None
    name = entry[:-1] if entry.endswith(WILDCARD) else entry
    try:
        validate_thing_name(name)
    except ShadowError as error:
        return (
            f"invalid subscription {entry!r}: {error.message}. Subscribe to a thing name, "
            "to a prefix pattern (the start of a thing name followed by '*') or to '*'"
        )
    return None


def _check_allowed(client: FeedClient, entry: str) -> str | None:
    """Return why ``client`` may not subscribe to the valid ``entry``, or None if it may."""
    own = client.only_thing
    if own is None or entry == own:
        return None
    return (
        f"forbidden subscription {entry!r}: device {own!r} may follow only its own thing; "
        f"subscribe to {own!r}"
    )


def _discard(index: dict[str, set[FeedClient]], name: str, client: FeedClient) -> None:
    clients = index.get(name)
    if clients is not None:
        clients.discard(client)
        if not clients:
            del index[name]


def add_feed_route(app: FastAPI, feed: ShadowFeed) -> None:
    @app.websocket(FEED_PATH)
    async def shadow_feed(websocket: WebSocket) -> None:
        claims = (websocket.scope.get("state") or {}).get(CLAIMS_STATE_KEY)
        device = claims.name if claims is not None and claims.role == ROLE_DEVICE else None
        await feed.serve(websocket, claims, device)
