"""The committed generated code matches the .proto sources (regenerated with the pinned grpcio-tools)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GEN = Path("protos/stanchion/v1")


def test_generated_code_has_no_drift(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts/gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.name for p in (tmp_path / GEN).iterdir())
    committed = sorted(
        p.name for p in (REPO / GEN).iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))
    )
    assert fresh == committed
    drifted = [n for n in fresh if (tmp_path / GEN / n).read_bytes() != (REPO / GEN / n).read_bytes()]
    assert not drifted, f"regenerate with `make protos`: {drifted} differ from their .proto sources"


def test_generated_modules_import_from_the_protos_package() -> None:
    from protos.stanchion.v1 import agent_pb2, agent_pb2_grpc, operator_pb2_grpc, types_pb2

    assert agent_pb2.DESCRIPTOR.package == "stanchion.v1"
    assert hasattr(agent_pb2_grpc, "AgentServiceStub") and hasattr(operator_pb2_grpc, "OperatorServiceStub")
    assert types_pb2.JobState.Name(types_pb2.JOB_STATE_RUNNING) == "JOB_STATE_RUNNING"
