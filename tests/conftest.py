"""Shared test helpers: free ports on 127.0.0.1, temporary run directories, and a subprocess
environment that keeps torch to one thread per process (2-core CI machines)."""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE_CORPUS = REPO / "tests" / "fixtures" / "corpus"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0 where the API allows it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


PYTHON = sys.executable


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> Iterator[int]:
    """A per-test random seed, printed so a failure can be replayed (STANCHION_TEST_SEED pins it)."""
    value = int(os.environ.get("STANCHION_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"[seed] {request.node.nodeid}: {value} (replay with STANCHION_TEST_SEED={value})")
    yield value


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture corpus prepared once per session (vocab 512)."""
    from support import prepare_data

    return prepare_data(tmp_path_factory.mktemp("data") / "fixture-512")
