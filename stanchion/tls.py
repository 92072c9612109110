"""TLS credentials from a certificate directory, for the coordinator (server) and for agents and
the CLI (clients). Every file is checked when it is loaded (present, PEM, key matching certificate,
valid now, naming the identity it is used as), so a mistake names its file here instead of showing
up later as a failed handshake."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from pathlib import Path
from typing import Any

import grpc

from stanchion.identity import (
    CA_CERT_FILE,
    CERTS_INIT_HINT,
    ROLE_AGENT,
    ROLE_COORDINATOR,
    TRUST_DOMAIN,
    cert_file_names,
    identity_from_auth_context,
    spiffe_id,
)

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A TLS directory that cannot be used: a missing, unreadable, mismatched or expired file."""


# One machine's own files under the names of a Kubernetes TLS Secret (what cert-manager writes, and
# what deploy/ mounts or loads with systemd's LoadCredential=).
SECRET_CA_FILE = "ca.crt"
SECRET_CERT_FILE = "tls.crt"
SECRET_KEY_FILE = "tls.key"


def tls_files(
    tls_dir: str | os.PathLike[str], role: str, node_id: str | None = None
) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) paths for ``role`` in ``tls_dir``, which holds either layout:

    - the output of `stanchion certs init`: ``ca.pem`` and ``<role>.pem``/``<role>-key.pem``
      (``agent-<node_id>.pem`` for agents), possibly for many roles;
    - one machine's files under Kubernetes TLS Secret names: ``ca.crt``, ``tls.crt``, ``tls.key``.

    Role-named files win when both are present. Raises TlsConfigError when neither is.
    """
    d = Path(tls_dir)
    cert_name, key_name = cert_file_names(role, node_id)
    if (d / cert_name).exists():
        cert, key = d / cert_name, d / key_name
    elif (d / SECRET_CERT_FILE).exists():
        cert, key = d / SECRET_CERT_FILE, d / SECRET_KEY_FILE
    else:
        raise TlsConfigError(f"{d} has neither {cert_name} nor {SECRET_CERT_FILE} ({CERTS_INIT_HINT})")
    return _ca_file(d), cert, key


def _ca_file(d: Path) -> Path:
    if (d / CA_CERT_FILE).exists() or not (d / SECRET_CA_FILE).exists():
        return d / CA_CERT_FILE
    return d / SECRET_CA_FILE


def _read_pem(path: Path, *, secret: bool = False) -> bytes:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TlsConfigError(f"{path} is missing ({CERTS_INIT_HINT})") from None
    except OSError as e:
        raise TlsConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{path} is not a PEM file")
    if secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("private key %s is readable by other users; chmod 600 it", path)
    return data


def _load_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes, Any]:
    """(certificate chain PEM, key PEM, parsed leaf), checked to belong together and to be valid
    now, so a mistake shows up here with a file name rather than as a failed handshake later."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read_pem(cert_path)
    key_pem = _read_pem(key_path, secret=True)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise TlsConfigError(f"{cert_path} is not a certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TlsConfigError(f"{key_path} is not an unencrypted private key: {e}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TlsConfigError(f"{key_path} is not the key of {cert_path}")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TlsConfigError(
            f"{cert_path} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now ({CERTS_INIT_HINT})"
        )
    return cert_pem, key_pem, cert


def _check_identity(cert: Any, path: Path, role: str, node_id: str | None, trust_domain: str) -> None:
    """Refuse a client certificate that names another Stanchion identity than the one it is used
    as (an agent started for node-3 with node-4's certificate would be denied on every call)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    found = identity_from_auth_context(
        {"transport_security_type": [b"ssl"], "peer_uri": [u.encode() for u in uris]},
        trust_domain=trust_domain,
    )
    if found is None:
        log.warning(
            "%s has no %s identity URI SAN; the coordinator will refuse it", path, f"spiffe://{trust_domain}/"
        )
    elif found.role != role or (role == ROLE_AGENT and found.name != node_id):
        wanted = f"node {node_id}" if role == ROLE_AGENT else f"the {role} role"
        raise TlsConfigError(f"{path} is for {spiffe_id(found.role, found.name, trust_domain)}, not {wanted}")


def server_credentials(
    tls_dir: str | os.PathLike[str], *, require_client_cert: bool = True
) -> grpc.ServerCredentials:
    """The coordinator's TLS credentials: its certificate, key and CA from ``tls_dir`` (`tls_files`).

    ``require_client_cert=True`` (mTLS, the default): the handshake refuses clients without a
    certificate from this CA. ``False``: server-only TLS; clients authenticate with bearer tokens
    (grpc then does not ask for client certificates at all, so certificate identities are unused).
    """
    ca_path, cert_path, key_path = tls_files(tls_dir, ROLE_COORDINATOR)
    chain, key, _ = _load_pair(cert_path, key_path)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=_read_pem(ca_path), require_client_auth=require_client_cert
    )


def channel_credentials(
    tls_dir: str | os.PathLike[str],
    role: str,
    node_id: str | None = None,
    *,
    trust_domain: str = TRUST_DOMAIN,
) -> grpc.ChannelCredentials:
    """mTLS credentials for a client: the CA plus ``<role>.pem`` (``agent-<node_id>.pem`` for
    agents), or ``tls.crt`` in a one-machine directory (`tls_files`). A certificate that names a
    different Stanchion identity is refused here.

    The target's host name must be a SAN of the coordinator's certificate; otherwise pass the
    channel option ``("grpc.ssl_target_name_override", "<a name in the certificate>")``.
    """
    ca_path, cert_path, key_path = tls_files(tls_dir, role, node_id)
    chain, key, cert = _load_pair(cert_path, key_path)
    _check_identity(cert, cert_path, role, node_id, trust_domain)
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_path), private_key=key, certificate_chain=chain
    )


def token_channel_credentials(tls_dir: str | os.PathLike[str], token: str) -> grpc.ChannelCredentials:
    """Server-verified TLS (only the CA file is needed) plus a bearer token sent with every call."""
    ca = _read_pem(_ca_file(Path(tls_dir)))
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=ca), grpc.access_token_call_credentials(token)
    )
