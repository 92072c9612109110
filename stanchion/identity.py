"""Who is who in a Stanchion cluster: roles, node ids, the SPIFFE-style identity a certificate
carries (``spiffe://stanchion/<role>/<name>``) and the names of certificate files. Shared by the
coordinator's gate, the daemons' and CLI's credentials and `stanchion certs`; no gRPC here."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

ROLE_COORDINATOR = "coordinator"
ROLE_AGENT = "agent"
ROLE_OPERATOR = "operator"
ROLE_READER = "reader"
ROLES = frozenset({ROLE_COORDINATOR, ROLE_AGENT, ROLE_OPERATOR, ROLE_READER})
# The caller on an --insecure server without tokens: no identity, allowed everything.
ROLE_ANONYMOUS = "anonymous"

TRUST_DOMAIN = "stanchion"
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # \Z: "$" would allow a trailing newline
NAME_RE = NODE_ID_RE  # operator and reader names follow the node-id rules too

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERTS_INIT_HINT = "create a development PKI with `stanchion certs init DIR`, or see docs/security.md"


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is a valid node id (letters, digits, ``._-``, 1-63 chars)."""
    if not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        raise ValueError(
            f"bad node id {node_id!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return node_id


def spiffe_id(role: str, name: str, trust_domain: str = TRUST_DOMAIN) -> str:
    """The URI SAN that names an identity: ``spiffe://stanchion/<role>/<name>``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(sorted(ROLES))}")
    if not NAME_RE.match(name):
        raise ValueError(f"bad name {name!r} for role {role}")
    return f"spiffe://{trust_domain}/{role}/{name}"


def cert_file_names(role: str, node_id: str | None = None) -> tuple[str, str]:
    """(certificate, key) file names for a role: ``operator.pem``, or ``agent-<node_id>.pem``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(sorted(ROLES))}")
    if role == ROLE_AGENT:
        if node_id is None:
            raise ValueError("the agent role needs a node id")
        stem = f"agent-{validate_node_id(node_id)}"
    elif node_id is not None:
        raise ValueError(f"a node id goes only with the agent role, not {role}")
    else:
        stem = role
    return f"{stem}.pem", f"{stem}-key.pem"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller. ``method`` says how: "mtls", "token", or "insecure" (no check)."""

    role: str
    name: str
    method: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name} ({self.method})"


ANONYMOUS = Identity(ROLE_ANONYMOUS, "anonymous", "insecure")


def identity_from_auth_context(
    auth_context: Mapping[str, Sequence[bytes]], *, trust_domain: str = TRUST_DOMAIN
) -> Identity | None:
    """The identity in a verified peer certificate, from ``context.auth_context()``; None without one.

    grpc lists the certificate's URI SANs under ``peer_uri`` (only after the handshake verified the
    chain against our CA). Exactly one ``spiffe://<trust_domain>/<role>/<name>`` URI must be present:
    none, or two that disagree, give None. Other URI SANs are ignored.
    """
    if b"ssl" not in auth_context.get("transport_security_type", ()):
        return None
    prefix = f"spiffe://{trust_domain}/"
    found: set[tuple[str, str]] = set()
    for raw in auth_context.get("peer_uri", ()):
        uri = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if not uri.startswith(prefix):
            continue
        parts = uri[len(prefix) :].split("/")
        if len(parts) != 2 or parts[0] not in ROLES or not NAME_RE.match(parts[1]):
            log.warning("ignoring malformed Stanchion identity %r in a peer certificate", uri)
            continue
        found.add((parts[0], parts[1]))
    if len(found) != 1:
        if len(found) > 1:
            log.warning("peer certificate names %d Stanchion identities; refusing it", len(found))
        return None
    role, name = found.pop()
    return Identity(role, name, "mtls")
