"""`init_pki` and `stanchion certs init`: the files, their SANs and EKUs, key permissions, chains that
verify, and the all-or-nothing write."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diagnostics import certs
from diagnostics.certs import PkiExistsError, init_pki
from diagnostics.commands.certs import EXIT_EXISTS, app
from stanchion.identity import NODE_ID_RE, Identity, identity_from_auth_context, spiffe_id

runner = CliRunner()

ROLE_FILES = ["coordinator", "operator", "reader", "agent-node-a", "agent-node-b"]
ALL_FILES = sorted(
    ["ca.pem", "ca-key.pem", *(f"{s}.pem" for s in ROLE_FILES), *(f"{s}-key.pem" for s in ROLE_FILES)]
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs") / "tls"
    result = init_pki(d, node_ids=["node-a", "node-b"], validity_days=30)
    assert sorted(Path(f).name for f in result["files"]) == ALL_FILES
    assert result["dir"] == str(d.absolute())
    return d


def test_writes_every_file_with_private_keys_readable_by_the_owner_only(pki: Path) -> None:
    assert sorted(p.name for p in pki.iterdir()) == ALL_FILES  # and no staging leftovers
    assert sorted(p.name for p in pki.parent.iterdir()) == ["tls"]
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    for p in pki.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == (0o600 if p.name.endswith("-key.pem") else 0o644), p.name


def test_keys_are_p256_and_match_their_certificates(pki: Path) -> None:
    for stem in ["ca", *ROLE_FILES]:
        key = load_pem_private_key((pki / f"{stem}-key.pem").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert key.public_key() == load(pki / f"{stem}.pem").public_key()


def test_identities_sans_and_key_usages(pki: Path) -> None:
    ca = load(pki / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    coordinator = load(pki / "coordinator.pem")
    assert sans(coordinator).get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans(coordinator).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ekus(coordinator) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    expected = {
        "coordinator": "spiffe://stanchion/coordinator/coordinator",
        "operator": "spiffe://stanchion/operator/operator",
        "reader": "spiffe://stanchion/reader/reader",
        "agent-node-a": "spiffe://stanchion/agent/node-a",
        "agent-node-b": "spiffe://stanchion/agent/node-b",
    }
    for stem, uri in expected.items():
        cert = load(pki / f"{stem}.pem")
        assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [uri]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.issuer == ca.subject
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc
        if stem != "coordinator":
            assert ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
            assert not sans(cert).get_values_for_type(x509.DNSName)


def test_chains_verify_as_tls_server_and_client(pki: Path) -> None:
    """cryptography's RFC 5280 verifier accepts the chains for the purposes they are used for."""
    ca = load(pki / "ca.pem")
    builder = PolicyBuilder().store(Store([ca]))
    server = builder.build_server_verifier(x509.DNSName("localhost"))
    server.verify(load(pki / "coordinator.pem"), [])
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(
        load(pki / "coordinator.pem"), []
    )
    client = builder.build_client_verifier()
    for stem in ROLE_FILES:
        verified = client.verify(load(pki / f"{stem}.pem"), [])
        assert verified.chain[-1] == ca
    with pytest.raises(x509.verification.VerificationError):
        server.verify(load(pki / "operator.pem"), [])  # no serverAuth, no host SAN


def test_hosts_become_dns_and_ip_sans(tmp_path: Path) -> None:
    init_pki(tmp_path / "t", node_ids=[], hosts=["coord.example.com", "10.0.0.7", "::1", "coord"])
    names = sans(load(tmp_path / "t" / "coordinator.pem"))
    assert names.get_values_for_type(x509.DNSName) == ["coord.example.com", "coord"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    init_pki(d, node_ids=["node-a"])
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(PkiExistsError, match=r"10 file\(s\) exist already"):
        init_pki(d, node_ids=["node-a"])
    # One colliding file is enough, and then nothing else is written either.
    with pytest.raises(PkiExistsError) as err:
        init_pki(d, node_ids=["node-a", "node-new"])
    assert "agent-node-a.pem" in {p.name for p in err.value.paths}
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls"]

    init_pki(d, node_ids=["node-a"], overwrite=True)
    assert (d / "ca.pem").read_bytes() != before["ca.pem"]
    assert sorted(p.name for p in d.iterdir()) == sorted(before)
    assert stat.S_IMODE((d / "ca-key.pem").stat().st_mode) == 0o600


def test_writes_into_an_existing_directory_and_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("mine")
    init_pki(tmp_path, node_ids=[])
    assert (tmp_path / "README").read_text() == "mine"
    assert (tmp_path / "operator.pem").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failure_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = certs._write
    written: list[str] = []

    def failing_write(path: Path, data: bytes, mode: int) -> None:
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        written.append(path.name)
        real_write(path, data, mode)

    monkeypatch.setattr(certs, "_write", failing_write)
    with pytest.raises(OSError, match="No space"):
        init_pki(tmp_path / "tls", node_ids=["node-a"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("node_id", ["", "-lead", ".hidden", "node a", "node/a", "n" * 64, "nöde", "a:b"])
def test_bad_node_ids_are_refused_before_anything_is_written(tmp_path: Path, node_id: str) -> None:
    with pytest.raises(ValueError, match="bad node id"):
        init_pki(tmp_path / "tls", node_ids=["node-0", node_id])
    assert not (tmp_path / "tls").exists()


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"node_ids": ["a", "a"]}, "repeat"),
        ({"node_ids": [], "hosts": []}, "at least one host"),
        ({"node_ids": [], "hosts": "localhost"}, "not a single string"),
        ({"node_ids": [], "hosts": ["bad host"]}, "neither an IP address nor a DNS name"),
        ({"node_ids": [], "validity_days": 0}, "at least 1"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        init_pki(tmp_path / "tls", **kwargs)
    assert not (tmp_path / "tls").exists()


@settings(max_examples=60, deadline=None)
@given(st.from_regex(NODE_ID_RE, fullmatch=True))
def test_every_valid_node_id_round_trips_through_its_uri_san(node_id: str) -> None:
    uri = spiffe_id("agent", node_id)
    ctx = {"transport_security_type": [b"ssl"], "peer_uri": [uri.encode()]}
    assert identity_from_auth_context(ctx) == Identity("agent", node_id, "mtls")


# --- the command ------------------------------------------------------------------------------


def test_cli_init_writes_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    result = runner.invoke(app, ["init", str(d), "--nodes", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert sorted(Path(f).name for f in data["files"]) == sorted(
        ["ca.pem", "ca-key.pem"]
        + [
            f"{s}{x}.pem"
            for s in ("coordinator", "operator", "reader", "agent-node-0", "agent-node-1")
            for x in ("", "-key")
        ]
    )
    assert data["identities"][str(d / "agent-node-1.pem")] == "spiffe://stanchion/agent/node-1"

    again = runner.invoke(app, ["init", str(d), "--node-id", "node-0"])
    assert again.exit_code == EXIT_EXISTS == 4
    assert "exist already" in again.stderr and "--overwrite" in again.stderr and again.stdout == ""

    over = runner.invoke(
        app, ["init", str(d), "--node-id", "gpu-7", "--host", "coord.internal", "--overwrite"]
    )
    assert over.exit_code == 0, over.stderr
    assert "agent-gpu-7.pem" in over.stdout and "wrote 10 files" in over.stderr
    # The old CA's agent certificates are still there, and the command says they no longer verify.
    assert "no longer verify" in over.stderr
    assert all(f"agent-node-{i}{x}.pem" in over.stderr for i in (0, 1) for x in ("", "-key"))
    assert sans(load(d / "coordinator.pem")).get_values_for_type(x509.DNSName) == ["coord.internal"]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--node-id", "bad id"], "bad node id"),
        (["--nodes", "2", "--node-id", "x"], "not both"),
        (["--host", "not a host"], "neither an IP address"),
    ],
)
def test_cli_usage_errors(tmp_path: Path, args: list[str], problem: str) -> None:
    result = runner.invoke(app, ["init", str(tmp_path / "tls"), *args])
    assert result.exit_code == 2 and problem in result.stderr
    assert not (tmp_path / "tls").exists()
