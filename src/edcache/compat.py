"""edflow's queue-server functions, kept for code that calls them (compatibility layer).

The main path for caching on several hosts is the CLI (``edcache --server`` /
``edcache --address``, see ``docs/distributed.md``). These three functions keep
edflow's names, signatures and behaviour: a server exposing an in-queue and an
out-queue, clients that connect to it, and a worker loop that drains the in-queue and
puts ``(name, pickle bytes)`` results on the out-queue. They run on
``multiprocessing.managers`` as before, made safe:

* **No well-known key.** ``authkey`` defaults to a fresh random 32-byte secret per
  server (``manager.authkey``; also printed as hex). Clients pass it, or read it from
  ``$EDCACHE_AUTHKEY`` (hex). The connection handshake is an HMAC challenge, so a
  peer without the key is refused before anything is unpickled.
* **Loopback by default.** The server binds 127.0.0.1 unless ``host`` says otherwise;
  a non-loopback bind needs a key of at least 16 bytes that is not edflow's old
  default ``b"edcache"``.
* **Workers that start early wait.** The in-queue knows when its producer is done
  (``inqueue.close()``); :func:`pickle_and_queue` returns only once the queue is
  closed and empty, not at the first moment it happens to be empty.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import pickle
import queue
import secrets
import threading
import time
import warnings
from collections.abc import Callable
from multiprocessing.managers import BaseManager
from typing import Any

#: edflow's default key, known to everyone: accepted only on loopback (with a warning).
LEGACY_AUTHKEY = b"edcache"
AUTHKEY_ENV = "EDCACHE_AUTHKEY"
DEFAULT_PORT = 63127


class WorkQueue:
    """A FIFO queue that its producer can close (``close()``; ``closed()``).

    Has the ``queue.Queue`` methods edflow code uses: ``put``, ``get`` (with
    ``block``/``timeout``), ``get_nowait``, ``put_nowait``, ``qsize``, ``empty``.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._queue.put(item, block, timeout)

    def put_nowait(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._queue.get(block, timeout)

    def get_nowait(self) -> Any:
        return self._queue.get_nowait()

    def qsize(self) -> int:
        return self._queue.qsize()

    def empty(self) -> bool:
        return self._queue.empty()

    def close(self) -> None:
        """No more items will be put: workers stop once the queue is drained."""
        self._closed.set()

    def closed(self) -> bool:
        return self._closed.is_set()


# One pair of queues per manager server process (the server runs in its own process).
_QUEUES: dict[str, WorkQueue] = {}


def _get_inqueue() -> WorkQueue:
    return _QUEUES.setdefault("in", WorkQueue())


def _get_outqueue() -> WorkQueue:
    return _QUEUES.setdefault("out", WorkQueue())


_EXPOSED = ("put", "put_nowait", "get", "get_nowait", "qsize", "empty", "close", "closed")


class QueueManager(BaseManager):
    """The manager class behind :func:`make_server_manager` / :func:`make_client_manager`."""

    def __init__(self, address: Any = None, authkey: bytes | None = None, **kwargs: Any) -> None:
        super().__init__(address, authkey, **kwargs)
        # what BaseManager uses: the given key, else this process's (multiprocessing's default)
        self._secret = bytes(authkey if authkey is not None else multiprocessing.current_process().authkey)

    @property
    def authkey(self) -> bytes:
        """The secret clients need."""
        return self._secret


QueueManager.register("get_inqueue", callable=_get_inqueue, exposed=_EXPOSED)
QueueManager.register("get_outqueue", callable=_get_outqueue, exposed=_EXPOSED)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_from_env() -> bytes | None:
    value = os.environ.get(AUTHKEY_ENV)
    if not value:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"${AUTHKEY_ENV} must be the key in hex (as the server printed it)") from None


def _check_key(authkey: bytes, host: str) -> bytes:
    if isinstance(authkey, str):
        authkey = authkey.encode()
    if not isinstance(authkey, (bytes, bytearray)) or not authkey:
        raise ValueError("authkey must be non-empty bytes")
    guessable = bytes(authkey) == LEGACY_AUTHKEY or len(authkey) < 16
    if guessable and not _is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host!r} with a guessable authkey: use the default (a random "
            "per-run key) or at least 16 random bytes"
        )
    if guessable:
        warnings.warn(
            "this authkey is guessable: any local user can connect and make the server unpickle "
            "data; leave authkey unset for a random per-run key",
            UserWarning,
            stacklevel=3,
        )
    return bytes(authkey)


def make_server_manager(port: int = DEFAULT_PORT, authkey: bytes | None = None, *,
                        host: str = "127.0.0.1") -> QueueManager:
    """Start a queue server on ``host:port`` and return its (started) manager.

    ``manager.get_inqueue()`` / ``manager.get_outqueue()`` return the shared queues.
    ``authkey=None`` (default) uses ``$EDCACHE_AUTHKEY`` if set, else a new random key;
    read it as ``manager.authkey``. Call ``manager.get_inqueue().close()`` once all work
    is queued, and ``manager.shutdown()`` at the end.
    """
    key = authkey if authkey is not None else (_key_from_env() or secrets.token_bytes(32))
    key = _check_key(key, host)
    manager = QueueManager(address=(host, port), authkey=key)
    manager.start()
    print(f"Started manager server at {manager.address!s}", flush=True)
    if authkey is None and os.environ.get(AUTHKEY_ENV) is None:
        print(f"Clients connect with authkey=bytes.fromhex({key.hex()!r}) "
              f"(or {AUTHKEY_ENV}={key.hex()})", flush=True)
    return manager


def make_client_manager(ip: str, port: int = DEFAULT_PORT, authkey: bytes | None = None) -> QueueManager:
    """Connect to the queue server at ``ip:port``; ``authkey`` defaults to ``$EDCACHE_AUTHKEY``.

    A wrong key fails with ``multiprocessing.AuthenticationError``.
    """
    key = authkey if authkey is not None else _key_from_env()
    if key is None:
        raise ValueError(
            "make_client_manager needs the server's authkey (there is no default key any more): "
            f"pass authkey=... or set ${AUTHKEY_ENV} to the hex key the server printed"
        )
    if isinstance(key, str):
        key = key.encode()
    manager = QueueManager(address=(ip, port), authkey=bytes(key))
    manager.connect()
    print(f"Connected to server at {manager.address!s}", flush=True)
    return manager


def pickle_and_queue(
    dataset_factory: Callable[[], Any],
    inqueue: Any,
    outqueue: Any,
    naming_template: str = "example_{}.p",
) -> None:
    """Worker loop: take lists of indices from ``inqueue``, put ``(name, pickle bytes)`` on ``outqueue``.

    ``name`` is ``naming_template.format(index)``. The dataset is created once with
    ``dataset_factory()``. Returns when ``inqueue`` is closed and drained (a ``None``
    item also stops the loop). With a plain queue that cannot be closed, it waits for
    the first item and returns once the queue is empty after that, as edflow did.
    An exception in the dataset names the index and propagates.
    """
    dataset = dataset_factory()
    closable = callable(getattr(inqueue, "closed", None))
    seen_work = False
    while True:
        try:
            indices = inqueue.get(timeout=0.2)
        except queue.Empty:
            if closable:
                if inqueue.closed():
                    try:  # items put just before close() are still taken
                        indices = inqueue.get_nowait()
                    except queue.Empty:
                        return
                else:
                    continue
            elif seen_work:
                return
            else:
                time.sleep(0.05)
                continue
        if indices is None:
            return
        seen_work = True
        for idx in indices:
            try:
                example = dataset[idx]
            except BaseException:
                print(f"Error getting example {idx}", flush=True)
                raise
            outqueue.put([naming_template.format(idx), pickle.dumps(example)])


__all__ = [
    "AUTHKEY_ENV",
    "DEFAULT_PORT",
    "QueueManager",
    "WorkQueue",
    "make_client_manager",
    "make_server_manager",
    "pickle_and_queue",
]
