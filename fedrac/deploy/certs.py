"""A local certificate authority, a SuperLink TLS certificate, and SuperNode key pairs.

The CA certificate (``ca.crt``) is public: it lets a site check that it talks to the
SuperLink, and it is no credential -- anyone may hold it. Private keys (``ca.key``,
``server.key``, SuperNode keys) are created with mode 0600 from the first byte.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write ``data`` atomically; a ``private`` file is created with mode 0600 (never wider,
    not even for a moment: the temporary file is opened with that mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrac"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_certificates(out_dir: str | Path, hosts: Sequence[str] = (), days: int = 365) -> dict:
    """Write ``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` into ``out_dir``.

    The server certificate is valid for ``hosts`` (names or IPs the SuperLink is
    reached at) plus 127.0.0.1, localhost and ::1. Returns the paths by name.
    """
    out = Path(out_dir)
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedrac local CA"))
        .issuer_name(_name("fedrac local CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", _pem_key(ca_key), private=True),
        "server_cert": _write(out / "server.pem", server_cert.public_bytes(pem)),
        "server_key": _write(out / "server.key", _pem_key(server_key), private=True),
    }


def make_node_keys(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write a SuperNode's EC P-384 key pair (OpenSSH format): ``<name>``, ``<name>.pub``.

    The private key goes to ``flower-supernode --auth-supernode-private-key``; the
    public key is registered with ``flwr supernode register <name>.pub <superlink>``.
    """
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return (_write(out / name, private, private=True),
            _write(out / f"{name}.pub", public + b"\n"))
