"""Mutual TLS: generated credentials, refusal of peers without them, loopback-only HTTP."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time

import pytest

from dist_datasets import EDCACHE, Proc, free_port, subprocess_env
from edcache.distributed.security import (
    ensure_credentials,
    make_security,
    tls_address,
)
from edcache.errors import ClusterError

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def test_generated_credentials_are_private_and_reused(tmp_path):
    path = str(tmp_path / "new" / "cluster.pem")
    p, created = ensure_credentials(path)
    assert (p, created) == (path, True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    text = open(path).read()
    assert text.count("BEGIN CERTIFICATE") == 2 and text.count("BEGIN PRIVATE KEY") == 1
    assert ensure_credentials(path) == (path, False)
    assert open(path).read() == text  # never regenerated behind the user's back
    sec = make_security(path)
    assert sec.require_encryption
    assert sec.tls_ca_file == sec.tls_worker_cert == sec.tls_client_cert == path


def test_readable_by_others_or_missing_credentials_are_refused(tmp_path):
    path, _ = ensure_credentials(str(tmp_path / "c.pem"))
    os.chmod(path, 0o644)
    with pytest.raises(ClusterError, match="chmod 600"):
        make_security(path)
    with pytest.raises(ClusterError, match="no credentials file"):
        make_security(str(tmp_path / "absent.pem"))


def test_addresses_are_tls_only():
    assert tls_address("host", 63127) == "tls://host:63127"
    assert tls_address("10.0.0.1:9000", 1) == "tls://10.0.0.1:9000"
    assert tls_address("tls://h:5", 1) == "tls://h:5"
    assert tls_address("[::1]:7", 1) == "tls://[::1]:7"
    with pytest.raises(ClusterError, match="mutual TLS"):
        tls_address("tcp://h:5", 1)


@pytest.fixture
def server(tmp_path):
    """A server for a dataset, with no worker: nothing should ever join it."""
    creds = str(tmp_path / "good.pem")
    port = free_port()
    env = subprocess_env(EDCACHE_TEST_ROOT=str(tmp_path / "root"), EDCACHE_TEST_N="16",
                         EDCACHE_TEST_DELAY="0")
    proc = Proc("server", [*EDCACHE, "--server", "--dataset", "dist_datasets.make", "--host",
                           "127.0.0.1", "--port", str(port), "--credentials", creds],
                env, str(tmp_path))
    try:
        proc.wait_for_output("waiting for workers", 60)
        yield proc, port, creds, env
    finally:
        proc.stop()


def _connected_workers(port: int, creds: str) -> int:
    from distributed import Client

    with Client(f"tls://127.0.0.1:{port}", security=make_security(creds), timeout="30s",
                set_as_default=False) as client:
        return len(client.nthreads())


def test_workers_and_clients_without_the_cluster_credentials_are_refused(server, tmp_path):
    proc, port, creds, env = server
    foreign, _ = ensure_credentials(str(tmp_path / "foreign.pem"))  # another cluster's file
    logdir = str(tmp_path)

    # a worker host holding another cluster's credentials: refused, exits 3 at once
    t0 = time.monotonic()
    w = Proc("foreign-worker", [*EDCACHE, "--address", f"127.0.0.1:{port}", "--dataset",
                                "dist_datasets.make", "--credentials", foreign, "--timeout", "30"],
             env, logdir)
    assert w.wait(60) == 3, w.output()
    assert "refused" in w.stderr() and time.monotonic() - t0 < 30
    # one without any credentials file, or asking for plain TCP: exits 3 before connecting
    w = Proc("no-credentials", [*EDCACHE, "--address", f"127.0.0.1:{port}", "--credentials",
                                str(tmp_path / "missing.pem")], env, logdir)
    assert w.wait(60) == 3 and "no credentials file" in w.stderr()
    w = Proc("plain-tcp", [*EDCACHE, "--address", f"tcp://127.0.0.1:{port}", "--credentials", creds],
             env, logdir)
    assert w.wait(60) == 3 and "mutual TLS" in w.stderr()

    # a Python client with foreign credentials
    from distributed import Client

    with pytest.raises(Exception):
        Client(f"tls://127.0.0.1:{port}", security=make_security(foreign), timeout="10s",
               set_as_default=False)
    # ... or through CachedDataset(scheduler=...): a ClusterError
    from edcache.distributed.executor import DaskExecutor

    with pytest.raises(ClusterError, match="cannot connect"):
        DaskExecutor(f"127.0.0.1:{port}", security=foreign, connect_timeout="10s")._connect()
    # a plain-TCP Dask client (no TLS at all)
    with pytest.raises(Exception):
        Client(f"tcp://127.0.0.1:{port}", timeout="5s", set_as_default=False)

    # raw TLS that trusts the server but presents no certificate: the server refuses
    ctx = ssl.create_default_context(cafile=creds)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"\0" * 64)
                if not tls.recv(1):  # TLS 1.3: the refusal arrives after the handshake
                    raise ConnectionError("closed by the server")
        print("raw TLS without a certificate:", repr(refused.value))

    # nothing joined, and the server is still serving the right credentials
    assert proc.alive()
    assert _connected_workers(port, creds) == 0


def test_http_routes_listen_on_loopback_only(tmp_path):
    """The scheduler's and workers' HTTP servers bind 127.0.0.1 whatever the scheduler's host."""
    from edcache.distributed.server import InProcessCluster

    creds, _ = ensure_credentials(str(tmp_path / "c.pem"))
    # 127.0.0.2: a loopback address other than the one the HTTP routes must use
    cluster = InProcessCluster(host="127.0.0.2", port=0, security=make_security(creds), local_workers=1)
    try:
        address = cluster.start()
        assert address.startswith("tls://127.0.0.2:")
        assert cluster.scheduler.http_server.address == "127.0.0.1"
        import urllib.error
        import urllib.request

        base = f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
        assert urllib.request.urlopen(f"{base}/health", timeout=10).read() == b"ok"
        with pytest.raises(urllib.error.HTTPError):  # no dashboard unless --dashboard
            urllib.request.urlopen(f"{base}/status", timeout=10)
        client = cluster.client()
        deadline = time.monotonic() + 60
        while not client.nthreads() and time.monotonic() < deadline:
            time.sleep(0.1)
        http = client.run(lambda dask_worker: dask_worker.http_server.address)
        assert list(http.values()) == ["127.0.0.1"]
    finally:
        cluster.close()


def test_own_certificates_instead_of_generated_credentials(tmp_path):
    """--tls-ca/--tls-cert/--tls-key: a user's own PKI; other credentials are refused."""
    from distributed import Client

    from edcache.distributed.security import _split_pem, generate_credentials_pem
    from edcache.distributed.server import InProcessCluster

    certs, keys = _split_pem(generate_credentials_pem("my-pki").decode())
    paths = {}
    for name, text in (("ca", certs[1]), ("cert", certs[0]), ("key", keys[0])):
        paths[name] = str(tmp_path / f"{name}.pem")
        with open(paths[name], "w") as f:
            f.write(text)
    own = make_security(ca=paths["ca"], cert=paths["cert"], key=paths["key"])
    cluster = InProcessCluster(host="127.0.0.1", port=0, security=own)
    try:
        address = cluster.start()
        with Client(address, security=own, timeout="30s", set_as_default=False) as client:
            assert client.nthreads() == {}
        other, _ = ensure_credentials(str(tmp_path / "other.pem"))
        with pytest.raises(Exception):
            Client(address, security=make_security(other), timeout="10s", set_as_default=False)
    finally:
        cluster.close()
