"""Password checks for the broker: off the event loop, coalesced, and remembered.

An Argon2 check costs tens of milliseconds of CPU and 64 MiB of memory on purpose, so a
reconnect storm of thousands of clients would take minutes if each CONNECT paid it. The
:class:`CredentialCache` therefore

* runs each check in a small thread pool, never on the event loop (argon2-cffi releases the
  GIL while it hashes);
* runs one check for concurrent CONNECTs with the same user name and password, and gives every
  one of them its result;
* remembers each result, keyed by an HMAC of user name and password under a key made at
  start-up (the password itself is not kept) and valid only while the user's stored hash is
  the one it was checked against. A changed password or a removed user is therefore
  checked again.

A user name that is not in the users file is checked against a dummy hash, so a wrong name
takes as long as a wrong password.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from .users import hash_password, verify_password

# Results kept. An entry costs about 200 bytes, so the cache stays under about 20 MiB; a
# fleet with more distinct credentials than this checks the oldest ones again.
MAX_CACHED_CREDENTIALS = 100_000
# Password checks that run at once. Each holds Argon2's 64 MiB while it runs, so two
# threads bound the memory for hashing to 128 MiB and leave the event loop a core.
HASH_THREADS = 2

CachedResult = tuple[str | None, bool]


class CredentialCache:
    def __init__(
        self, max_entries: int = MAX_CACHED_CREDENTIALS, threads: int = HASH_THREADS
    ) -> None:
        self.max_entries = max_entries
        self.threads = threads
        self._key = secrets.token_bytes(32)
        # Digest of (user name, password) -> (the stored hash it was checked against, result).
        self._results: dict[bytes, CachedResult] = {}
        self._pending: dict[tuple[bytes, str | None], asyncio.Future[bool]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()
        # Password hash checks started, for tests and statistics.
        self.verifications = 0

    def check(
        self, name: str, password_hash: str | None, password: bytes
    ) -> bool | asyncio.Future[bool]:
        """Return whether ``password`` is right for ``name``, or a future of that answer.

        ``password_hash`` is the user's stored hash, or None for an unknown user name. Call
        it on the event loop: a cached answer comes back at once, and a new check runs in
        the thread pool.
        """
        name_bytes = name.encode()
        digest = hmac.digest(
            self._key, len(name_bytes).to_bytes(4, "big") + name_bytes + password, "sha256"
        )
        cached = self._results.get(digest)
        if cached is not None and cached[0] == password_hash:
            return cached[1]
        pending_key = (digest, password_hash)
        future = self._pending.get(pending_key)
        if future is not None:
            return future
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="password")
        loop = asyncio.get_running_loop()
        # NOTE: the queue of checks waiting for a thread is unbounded; a flood of distinct
        # wrong passwords makes it long, and only connection limits bound it.
        future = loop.run_in_executor(self._executor, self._verify, password_hash, password)
        self.verifications += 1
        self._pending[pending_key] = future
        future.add_done_callback(partial(self._remember, digest, pending_key, password_hash))
        return future

    def _verify(self, password_hash: str | None, password: bytes) -> bool:
        if password_hash is not None:
            return verify_password(password_hash, password)
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = hash_password(secrets.token_bytes(16))
        verify_password(self._dummy_hash, password)
        return False

    def _remember(
        self,
        digest: bytes,
        pending_key: tuple[bytes, str | None],
        password_hash: str | None,
        future: asyncio.Future[bool],
    ) -> None:
        self._pending.pop(pending_key, None)
        if future.cancelled() or future.exception() is not None:
            return
        results = self._results
        if len(results) >= self.max_entries:
            del results[next(iter(results))]  # the oldest entry
        results[digest] = (password_hash, future.result())

    def clear(self) -> None:
        self._results.clear()

    def close(self) -> None:
        """Stop the thread pool; checks under way finish, queued ones are dropped."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
