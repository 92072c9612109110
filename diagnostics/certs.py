"""A development PKI for Stanchion's mTLS: one CA and a certificate per role, made with `cryptography`.

Layout of the directory `init_pki` writes (keys are 0600, certificates 0644)::

    ca.pem  ca-key.pem                        the CA; keep ca-key.pem off the cluster
    coordinator.pem  coordinator-key.pem      server + client auth, SANs = the coordinator's hosts
    operator.pem  operator-key.pem            client auth, the operator role
    reader.pem  reader-key.pem                client auth, the read-only role
    agent-<node>.pem  agent-<node>-key.pem    client auth, one per node

Each certificate names its identity in a URI SAN, ``spiffe://stanchion/<role>/<name>`` (for agents the
name is the node id); the coordinator's interceptor reads nothing else. Production users bring their
own PKI instead (docs/security.md says what the certificates need).

The write is all or nothing: every file is made in a temporary directory first, existing files are
refused unless ``overwrite``, and only then are the files renamed into place.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stanchion.files import fsync_dir
from stanchion.identity import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    ROLE_AGENT,
    ROLE_COORDINATOR,
    ROLE_OPERATOR,
    ROLE_READER,
    cert_file_names,
    spiffe_id,
    validate_node_id,
)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
# Certificates start a few minutes in the past so a node whose clock runs behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PkiExistsError(FileExistsError):
    """Some of the files `init_pki` would write exist already (and ``overwrite`` was not given)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        names = ", ".join(p.name for p in self.paths[:4]) + (" ..." if len(self.paths) > 4 else "")
        super().__init__(f"{len(self.paths)} file(s) exist already in {self.paths[0].parent}: {names}")


@dataclass(frozen=True)
class _Leaf:
    role: str
    name: str
    server: bool  # serverAuth EKU and the host SANs

    @property
    def files(self) -> tuple[str, str]:
        return cert_file_names(self.role, self.name if self.role == ROLE_AGENT else None)


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if host.startswith("*."):
        labels = labels[1:]  # a wildcard is allowed as the leftmost label only
    if not labels or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(now: dt.datetime, validity: dt.timedelta) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stanchion"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Stanchion development CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    leaf: _Leaf,
    hosts: Sequence[x509.GeneralName],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime,
    validity: dt.timedelta,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(leaf.role, leaf.name))]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if leaf.server:
        sans = [*hosts, *sans]
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stanchion"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, leaf.role),
            x509.NameAttribute(NameOID.COMMON_NAME, leaf.name),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # the umask may have taken bits away from certificates


def init_pki(
    dir: str | os.PathLike[str],
    *,
    node_ids: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    validity_days: int = 365,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Create a development CA and certificates for the coordinator, operator, reader and each node.

    Returns ``{"dir", "files", "identities", "not_after", "stale"}``: the files written (absolute
    paths, in write order), the URI SAN identity of each certificate, the expiry (ISO-8601 UTC), and
    agent files already in the directory that this CA did not sign (after ``overwrite``: they no
    longer verify; remove them).
    Raises ValueError for a bad node id, host or validity, and PkiExistsError when any file exists
    already and ``overwrite`` is false (nothing is written then).
    """
    out = Path(dir).absolute()
    node_ids = [validate_node_id(n) for n in node_ids]
    if len(set(node_ids)) != len(node_ids):
        dupes = sorted({n for n in node_ids if node_ids.count(n) > 1})
        raise ValueError(f"node ids repeat: {', '.join(dupes)}")
    if isinstance(hosts, str):
        raise ValueError("hosts must be a sequence of names, not a single string")
    if not hosts:
        raise ValueError("at least one host is needed for the coordinator's certificate")
    host_sans = [_host_san(h) for h in dict.fromkeys(hosts)]
    if validity_days < 1:
        raise ValueError(f"validity_days must be at least 1, got {validity_days}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")

    leaves = [
        _Leaf(ROLE_COORDINATOR, ROLE_COORDINATOR, server=True),
        _Leaf(ROLE_OPERATOR, ROLE_OPERATOR, server=False),
        _Leaf(ROLE_READER, ROLE_READER, server=False),
        *(_Leaf(ROLE_AGENT, n, server=False) for n in node_ids),
    ]
    names = [CA_CERT_FILE, CA_KEY_FILE, *(f for leaf in leaves for f in leaf.files)]
    existing = [out / n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise PkiExistsError(existing)  # checked before any key is made: fail fast, write nothing

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    validity = dt.timedelta(days=validity_days)
    ca_key, ca_cert = _make_ca(now, validity)
    contents: dict[str, tuple[bytes, int]] = {
        CA_CERT_FILE: (_cert_pem(ca_cert), 0o644),
        CA_KEY_FILE: (_key_pem(ca_key), 0o600),
    }
    identities = {CA_CERT_FILE: ""}
    for leaf in leaves:
        key, cert = _make_leaf(leaf, host_sans, ca_key, ca_cert, now, validity)
        cert_name, key_name = leaf.files
        contents[cert_name] = (_cert_pem(cert), 0o644)
        contents[key_name] = (_key_pem(key), 0o600)
        identities[cert_name] = spiffe_id(leaf.role, leaf.name)

    # Stage everything next to the target, so the final renames stay on one file system.
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = not out.exists()
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{secrets.token_hex(4)}-", dir=out.parent))
    try:
        for name, (data, mode) in contents.items():
            _write(stage / name, data, mode)
        fsync_dir(stage)
        if fresh:
            os.rename(stage, out)  # one atomic step; mkdtemp made it 0700
        else:
            existing = [out / n for n in names if (out / n).exists()]
            if existing and not overwrite:  # appeared while the keys were being made
                raise PkiExistsError(existing)
            for name in names:
                os.replace(stage / name, out / name)
            fsync_dir(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    stale = sorted(p for p in out.glob("agent-*.pem") if p.name not in names)
    return {
        "dir": str(out),
        "files": [str(out / n) for n in names],
        "identities": {str(out / n): ident for n, ident in identities.items()},
        "not_after": (now + validity).isoformat().replace("+00:00", "Z"),
        "stale": [str(p) for p in stale],
    }
