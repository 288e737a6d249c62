"""edflow's make_server_manager / make_client_manager / pickle_and_queue, made safe."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import sys
import time

import numpy as np
import pytest

from dist_datasets import Proc, Squares, free_port, subprocess_env
from edcache import make_client_manager, make_server_manager, pickle_and_queue

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

WORKER = """
import os, sys
from edcache import make_client_manager, pickle_and_queue
import dist_datasets
m = make_client_manager("127.0.0.1", int(sys.argv[1]))  # key from $EDCACHE_AUTHKEY
pickle_and_queue(dist_datasets.make, m.get_inqueue(), m.get_outqueue(), naming_template="ex_{}.p")
print("worker done", flush=True)
"""


def test_three_functions_round_trip_a_small_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("EDCACHE_AUTHKEY", raising=False)
    n, port = 40, free_port()
    server = make_server_manager(port=port)  # random per-run key, loopback
    procs = []
    try:
        assert server.address == ("127.0.0.1", port)
        assert len(server.authkey) == 32 and server.authkey != b"edcache"
        env = subprocess_env(EDCACHE_AUTHKEY=server.authkey.hex(), EDCACHE_TEST_N=str(n),
                             EDCACHE_TEST_DELAY="0", EDCACHE_TEST_ROOT=str(tmp_path))
        start = lambda name: Proc(name, [sys.executable, "-c", WORKER, str(port)], env, str(tmp_path))  # noqa: E731
        procs.append(start("early"))  # starts before any work is queued: must wait, not quit
        time.sleep(1.5)
        assert procs[0].alive(), procs[0].output()
        inq, outq = server.get_inqueue(), server.get_outqueue()
        for s in range(0, n, 8):
            inq.put(list(range(s, min(s + 8, n))))
        procs.append(start("late"))
        inq.close()
        results = {}
        deadline = time.monotonic() + 60
        while len(results) < n and time.monotonic() < deadline:
            try:
                name, data = outq.get(timeout=1)
            except queue.Empty:
                continue
            results[name] = pickle.loads(data)
        for p in procs:
            assert p.wait(30) == 0, p.output()
            assert "worker done" in p.stdout()
        reference = Squares(str(tmp_path), n=n, delay=0)
        assert sorted(results) == sorted(f"ex_{i}.p" for i in range(n))
        for i in range(n):
            got, want = results[f"ex_{i}.p"], reference[i]
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_equal(got[key], want[key])
    finally:
        for p in procs:
            p.stop()
        server.shutdown()


def test_client_with_a_wrong_or_missing_key_is_refused(monkeypatch):
    monkeypatch.delenv("EDCACHE_AUTHKEY", raising=False)
    port = free_port()
    server = make_server_manager(port=port)
    try:
        with pytest.raises(multiprocessing.AuthenticationError):
            make_client_manager("127.0.0.1", port, authkey=os.urandom(32))
        with pytest.raises(multiprocessing.AuthenticationError):
            make_client_manager("127.0.0.1", port, authkey=b"edcache")  # edflow's old default
        with pytest.raises(ValueError, match="authkey"):
            make_client_manager("127.0.0.1", port)  # no default key any more
        ok = make_client_manager("127.0.0.1", port, authkey=server.authkey)
        ok.get_inqueue().put([1, 2])
        assert server.get_inqueue().qsize() == 1
    finally:
        server.shutdown()


def test_guessable_keys_only_on_loopback():
    with pytest.raises(ValueError, match="guessable"):
        make_server_manager(port=free_port(), authkey=b"edcache", host="0.0.0.0")
    with pytest.warns(UserWarning, match="guessable"):
        m = make_server_manager(port=free_port(), authkey=b"edcache")
    m.shutdown()


def test_pickle_and_queue_with_plain_queues_waits_for_first_item(tmp_path):
    """With queue.Queue (cannot be closed) an early worker waits for work, as edflow intended."""
    import threading

    inq, outq = queue.Queue(), queue.Queue()
    t = threading.Thread(target=pickle_and_queue,
                         args=(lambda: Squares(str(tmp_path), n=10, delay=0), inq, outq))
    t.start()
    time.sleep(0.5)
    assert t.is_alive()
    inq.put([3, 4])
    t.join(10)
    assert not t.is_alive()
    assert sorted(outq.get()[0] for _ in range(2)) == ["example_3.p", "example_4.p"]
