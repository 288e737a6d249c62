"""Credentials for an edcache cluster: mutual TLS with a private CA, in one file.

An edcache cluster trusts exactly one thing: holding the cluster's private key and the
certificate the cluster's CA signed for it. The server creates both on first start
(:func:`ensure_credentials`) and writes them to a single PEM file that only the user
can read (mode 0600): the leaf certificate, the CA certificate, then the leaf's
private key. The CA's own private key is thrown away after signing, so nobody (not
even the file's owner) can mint further certificates for the cluster; delete the file
to start a new cluster with new credentials.

Copy that file to each worker host (or keep it on a shared home directory) and pass
it to ``edcache --address ... --credentials FILE``. A peer without it, or with the file
of another cluster, fails the TLS handshake.

Users with their own PKI pass ``ca``/``cert``/``key`` paths instead
(:func:`make_security`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
import tempfile
from typing import Any

from ..errors import ClusterError

#: Where the server keeps its credentials unless told otherwise.
DEFAULT_CREDENTIALS = os.path.join("~", ".edcache", "credentials.pem")
#: Environment variable that overrides :data:`DEFAULT_CREDENTIALS`.
CREDENTIALS_ENV = "EDCACHE_CREDENTIALS"

_VALID_DAYS = 3650


def default_credentials_path() -> str:
    """``$EDCACHE_CREDENTIALS`` or ``~/.edcache/credentials.pem`` (expanded, absolute)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CREDENTIALS_ENV) or DEFAULT_CREDENTIALS))


def generate_credentials_pem(common_name: str = "edcache") -> bytes:
    """A new private CA and one leaf certificate it signed, as PEM bytes.

    Order: leaf certificate, CA certificate, leaf private key (unencrypted PKCS#8).
    Keys are ECDSA P-256 (fast handshakes); the CA's private key is not returned.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=_VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} private CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        leaf.public_bytes(pem)
        + ca_cert.public_bytes(pem)
        + key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def write_credentials(path: str, pem: bytes) -> None:
    """Write ``pem`` to ``path`` with mode 0600, atomically, never replacing a file."""
    path = os.path.abspath(os.path.expanduser(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-credentials-", dir=directory)  # created 0600
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if another process created the file meanwhile
    finally:
        os.unlink(tmp)


def ensure_credentials(path: str | None = None) -> tuple[str, bool]:
    """Return ``(path, created)``: the credentials file, generated (0600) if missing."""
    path = os.path.abspath(os.path.expanduser(path)) if path else default_credentials_path()
    if os.path.exists(path):
        check_credentials_file(path)
        return path, False
    with contextlib.suppress(FileExistsError):  # a concurrent start won the race: use its file
        write_credentials(path, generate_credentials_pem())
    check_credentials_file(path)
    return path, True


def _split_pem(data: str) -> tuple[list[str], list[str]]:
    certs: list[str] = []
    keys: list[str] = []
    block: list[str] = []
    for line in data.splitlines():
        if line.startswith("-----BEGIN "):
            block = [line]
        elif block:
            block.append(line)
            if line.startswith("-----END "):
                text = "\n".join(block) + "\n"
                (certs if "CERTIFICATE" in line else keys).append(text)
                block = []
    return certs, keys


def check_credentials_file(path: str) -> None:
    """Raise :class:`ClusterError` unless ``path`` is a private, well-formed credentials file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ClusterError(f"cannot read the credentials file {path}: {exc}") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClusterError(
            f"the credentials file {path} is accessible by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); it holds the cluster's private key. "
            f"Run: chmod 600 {path}"
        )
    with open(path) as f:
        certs, keys = _split_pem(f.read())
    if len(certs) < 2 or len(keys) != 1:
        raise ClusterError(
            f"{path} is not an edcache credentials file (expected a certificate, the CA "
            f"certificate and a private key; found {len(certs)} certificate(s), {len(keys)} key(s))"
        )


def make_security(
    credentials: str | None = None,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    create: bool = False,
) -> Any:
    """A ``distributed.Security`` for mutual TLS with encryption required in every role.

    Either ``credentials`` (an edcache credentials file; the default file if None) or
    your own ``ca`` + ``cert`` (+ ``key`` if not inside ``cert``) PEM paths. With
    ``create=True`` a missing credentials file is generated (what the server does);
    otherwise a missing file is a :class:`ClusterError` naming it.
    """
    from distributed.security import Security

    if ca or cert or key:
        if not (ca and cert):
            raise ClusterError("own certificates need both a CA file and a certificate (plus key)")
        for p in (ca, cert, key):
            if p and not os.path.isfile(p):
                raise ClusterError(f"TLS file {p} does not exist")
        ca_data = os.path.abspath(ca)
        cert_path, key_path = os.path.abspath(cert), os.path.abspath(key) if key else None
    else:
        if create:
            path, _ = ensure_credentials(credentials)
        else:
            path = os.path.abspath(os.path.expanduser(credentials)) if credentials else default_credentials_path()
            if not os.path.exists(path):
                raise ClusterError(
                    f"no credentials file at {path}: copy the server's credentials file (named in "
                    "the worker command it prints) to this host and pass --credentials FILE "
                    "(security=FILE in Python)"
                )
            check_credentials_file(path)
        # One file for all three: OpenSSL takes the leaf (listed first), its chain and
        # the key from it, and trusts the certificates in it (the CA; trusting the leaf
        # too grants nothing more: presenting it needs the key). Paths rather than
        # in-memory PEM (and the key named explicitly), so the same Security works for
        # dask-jobqueue's job scripts and `dask worker --tls-*` options.
        ca_data = cert_path = key_path = path
    roles: dict[str, Any] = {}
    for role in ("client", "scheduler", "worker"):
        roles[f"tls_{role}_cert"] = cert_path
        roles[f"tls_{role}_key"] = key_path
    return Security(require_encryption=True, tls_ca_file=ca_data, **roles)


def as_security(security: Any) -> Any:
    """Turn what a user passed as ``security=`` into a ``distributed.Security``.

    ``None`` means the default credentials file; a string or path is a credentials
    file; a ``Security`` object is used as given.
    """
    if security is None or isinstance(security, (str, os.PathLike)):
        return make_security(os.fspath(security) if security is not None else None)
    return security


def tls_address(address: str, default_port: int) -> str:
    """Normalise ``HOST``, ``HOST:PORT`` or ``tls://HOST:PORT`` to ``tls://HOST:PORT``.

    Anything other than ``tls://`` is refused: edcache never talks to an
    unauthenticated peer.
    """
    address = address.strip()
    if "://" in address:
        scheme, _, rest = address.partition("://")
        if scheme != "tls":
            raise ClusterError(
                f"address {address!r}: edcache clusters use mutual TLS; write tls://HOST:PORT or HOST:PORT"
            )
        address = rest
    host, port = address, default_port
    if address.startswith("["):  # [ipv6]:port
        end = address.index("]")
        host, tail = address[: end + 1], address[end + 1:]
        if tail.startswith(":"):
            port = int(tail[1:])
    elif address.count(":") == 1:
        host, _, p = address.partition(":")
        port = int(p)
    if not host:
        raise ClusterError(f"address {address!r} has no host")
    return f"tls://{host}:{port}"


__all__ = [
    "CREDENTIALS_ENV",
    "DEFAULT_CREDENTIALS",
    "as_security",
    "check_credentials_file",
    "default_credentials_path",
    "ensure_credentials",
    "generate_credentials_pem",
    "make_security",
    "tls_address",
    "write_credentials",
]
