"""Certificates and keys for a test federation: TLS for the SuperLink, keys for SuperNode auth.

``make_test_pki(folder, hosts=["127.0.0.1"], nodes=3)`` writes

- ``ca.crt`` / ``ca.key``: a self-signed CA (ECDSA P-384). SuperNodes and the ``flwr`` CLI
  trust it (``--root-certificates ca.crt``, ``root-certificates`` in the connection);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, with a
  subjectAltName for every host name or IP address clients use to reach it, plus
  127.0.0.1 and localhost (the SuperLink's own SuperExec connects over loopback);
- ``node-<i>`` / ``node-<i>.pub``: one ECDSA P-384 key pair per SuperNode in OpenSSH format,
  as ``ssh-keygen -t ecdsa -b 384 -N '' -f node-<i>`` makes. The SuperLink admits a node
  once ``flwr supernode register node-<i>.pub <connection>`` registered its public key,
  and the node proves it with ``--auth-supernode-private-key node-<i>``.

For a real deployment use your own CA and keep ``ca.key`` and the node private keys off
shared disks; this module is for tests and first experiments (``python -m
prelort.flower.certs DIR --hosts 10.0.0.5 --nodes 4``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TestPKI:
    """Paths of what ``make_test_pki`` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]
    """Private keys (OpenSSH PEM) for ``--auth-supernode-private-key``."""
    node_public_keys: tuple[Path, ...]
    """Public keys (``ecdsa-sha2-nistp384 ...``) for ``flwr supernode register``."""


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_node_key(private_path: Path) -> Path:
    """One SuperNode key pair (ECDSA P-384, OpenSSH format); returns the ``.pub`` path."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        private=True,
    )
    public = private_path.with_name(private_path.name + ".pub")
    _write(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n",
    )
    return public


def make_test_pki(
    folder: str | Path, *, hosts: Sequence[str] = ("127.0.0.1",), nodes: int = 0, days: int = 30
) -> TestPKI:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PreLort test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    names = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pki_paths = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server.crt": server_cert.public_bytes(serialization.Encoding.PEM),
    }
    for name, data in pki_paths.items():
        _write(out / name, data)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.key", _pem_key(server_key), private=True)
    node_keys = tuple(out / f"node-{i}" for i in range(nodes))
    publics = tuple(make_node_key(p) for p in node_keys)
    return TestPKI(out / "ca.crt", out / "server.crt", out / "server.key", node_keys, publics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prelort.flower.certs DIR [--hosts H1,H2] [--nodes N]``."""
    p = argparse.ArgumentParser(prog="python -m prelort.flower.certs", description=__doc__.split("\n")[0])
    p.add_argument("folder", help="where to write ca.crt, server.crt/.key and node-<i>/.pub")
    p.add_argument("--hosts", default="127.0.0.1", help="SuperLink IPs/DNS names, comma-separated")
    p.add_argument("--nodes", type=int, default=0, help="how many SuperNode key pairs to make")
    args = p.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    pki = make_test_pki(args.folder, hosts=hosts, nodes=args.nodes)
    print(f"CA: {pki.ca_cert}\nSuperLink: {pki.server_cert} {pki.server_key}")
    for key, pub in zip(pki.node_keys, pki.node_public_keys, strict=True):
        print(f"SuperNode: {key} (register {pub})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
