"""How an agent daemon runs. Defaults < TOML file < ``STANCHION_*`` environment < CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stanchion.identity import NODE_ID_RE
from stanchion.settings import option, require

BUILTIN_ENTRYPOINT = "trainer"  # the built-in trainer (`python -m trainer`): always allowed, never remapped
ENTRYPOINT_HINT = "agent serve --entrypoint NAME=MODULE_OR_SCRIPT"


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str = option("127.0.0.1:50051", "Coordinator address HOST:PORT.")
    node_id: str = option("", "This node's id (must match its certificate).")
    workers: int = option(1, "Trainer ranks on this node (one per GPU).")
    run_root: str = option("runs", "Run directories (and checkpoints) go under this directory.")
    data_root: str = option("", "Job specs name data relative to this directory (empty: RUN_ROOT/../data).")
    spare: bool = option(False, "Join jobs only to replace a lost node.")
    metrics_port: int = option(-1, "Prometheus port (-1: off, 0: any free port).")
    metrics_addr: str = option("127.0.0.1", "Address metrics and health bind.")
    health_port: int = option(0, "Plaintext grpc.health.v1 port for probes (0: off).")
    host: str = option("127.0.0.1", "Address other nodes use to reach this node's rendezvous store.")
    tls_dir: str = option("", "mTLS directory (stanchion certs init).")
    insecure: bool = option(False, "Plaintext gRPC: for local experiments only.")
    token_file: str = option("", "A file holding this agent's bearer token.")
    standby: int = option(1, "Pre-warmed standby ranks to keep ready.")
    # Programs a job spec may name besides the built-in trainer: "NAME=TARGET", TARGET a script
    # (.py, stored absolute) or a dotted module. A spec names only NAME; this node decides what it runs.
    entrypoints: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "--entrypoint",
            "metavar": "NAME=MODULE_OR_SCRIPT",
            "help": (
                'A program job specs may run with entrypoint = "NAME": a .py script or a dotted module, '
                "given the job's args. Repeatable; 'trainer' (the built-in trainer) is always allowed."
            ),
        },
    )
    hang_factor: float = 5.0  # no step within factor x median step time ...
    hang_floor_s: float = option(30.0, "A rank with no step for at least this long may be hung.")
    frozen_after_s: float = option(
        0.25, "A rank stopped by a signal (SIGSTOP) whose heartbeat is silent this long is hung."
    )
    startup_timeout_s: float = 300.0  # first step of a generation must come within this
    rejoin_grace_s: float = (
        15.0  # a survivor still in the old generation this long after reassignment is killed
    )
    stop_grace_s: float = option(
        60.0, "SIGTERM, then SIGKILL after this many seconds (room for an emergency checkpoint)."
    )
    orphan_grace_s: float = option(
        30.0,
        "Ranks outlive their agent this long, training on, for a restarted agent to adopt them "
        "(0: they die with it).",
    )
    rpc_timeout_s: float = 5.0
    max_backoff_s: float = 2.0  # retries while the coordinator is unreachable (it reconciles for 10 s)
    simulate_defect: str = option(
        "", "persistent or intermittent:P: corrupt this node's matmuls (bisection tests)."
    )
    threads: int = 1  # torch threads per rank on CPU (also OMP_NUM_THREADS)
    health_interval_s: float = 10.0

    def __post_init__(self) -> None:
        require(
            bool(NODE_ID_RE.match(self.node_id)),
            "node_id",
            "required: 1-63 letters, digits, '.', '_' or '-', starting alphanumeric",
        )
        host, sep, port = self.coordinator.rpartition(":")
        require(bool(sep) and bool(host) and port.isdigit(), "coordinator", "expected HOST:PORT")
        require(1 <= self.workers <= 64, "workers", "must be between 1 and 64")
        require(
            -1 <= self.metrics_port < 65536,
            "metrics_port",
            "must be a port number (-1: off, 0: any free port)",
        )
        require(0 <= self.health_port < 65536, "health_port", "must be a port number (0: off)")
        require(
            self.insecure or bool(self.tls_dir),
            "tls_dir",
            "TLS is the default: pass --tls-dir DIR (see `stanchion certs init`), or --insecure for plaintext",
        )
        require(0 <= self.standby <= 8, "standby", "must be between 0 and 8")
        object.__setattr__(self, "entrypoints", _check_entrypoints(self.entrypoints))
        require(
            self.hang_factor >= 1 and self.hang_floor_s > 0,
            "hang_factor",
            "hang_factor >= 1 and hang_floor_s > 0",
        )
        require(self.frozen_after_s > 0, "frozen_after_s", "must be > 0 seconds")
        require(self.stop_grace_s >= 0, "stop_grace_s", "must be >= 0")
        require(
            self.orphan_grace_s >= 0, "orphan_grace_s", "must be >= 0 seconds (0: ranks die with the agent)"
        )
        if self.simulate_defect:
            kind, _, p = self.simulate_defect.partition(":")
            ok = kind == "persistent" and not p or kind == "intermittent" and _is_prob(p)
            require(ok, "simulate_defect", "expected 'persistent' or 'intermittent:P' with 0 < P <= 1")

    def entrypoint_targets(self) -> dict[str, str]:
        """NAME -> TARGET of the programs this node allows besides the built-in trainer."""
        return {name: target for name, _, target in (e.partition("=") for e in self.entrypoints)}

    def defect_faults(self) -> list[dict]:
        """The simulated defect as a fault schedule for this node's ranks (the integrity issue's compute fault)."""
        if not self.simulate_defect:
            return []
        kind, _, p = self.simulate_defect.partition(":")
        return [
            {"kind": "compute", "rank": -1, "from_step": 0, "prob": 1.0 if kind == "persistent" else float(p)}
        ]


def _check_entrypoints(items: tuple[str, ...]) -> tuple[str, ...]:
    """Validate ``NAME=TARGET`` entries; scripts become absolute paths (the agent's working directory
    does not matter once it runs)."""
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        name, sep, target = item.partition("=")
        name, target = name.strip(), target.strip()
        require(
            bool(sep) and bool(name) and bool(target),
            "entrypoint",
            f"{item!r}: expected NAME=MODULE_OR_SCRIPT, e.g. --entrypoint own=train.py or lm=mypkg.train",
        )
        require(
            bool(NODE_ID_RE.match(name)),
            "entrypoint",
            f"{name!r} is not a name: use 1-63 letters, digits, '.', '_' or '-', starting alphanumeric",
        )
        require(
            name != BUILTIN_ENTRYPOINT,
            "entrypoint",
            f"{BUILTIN_ENTRYPOINT!r} is reserved for the built-in trainer; give your program another name",
        )
        require(name not in seen, "entrypoint", f"{name!r} is given twice; give each program one name")
        seen.add(name)
        if target.endswith(".py"):
            path = Path(target).expanduser()
            require(path.is_file(), "entrypoint", f"{name}={target}: no such file {str(path.absolute())!r}")
            target = str(path.absolute())
        else:
            require(
                all(part.isidentifier() for part in target.split(".")),
                "entrypoint",
                f"{name}={target}: {target!r} is neither a .py script nor a dotted Python module name "
                "(e.g. mypkg.train)",
            )
        out.append(f"{name}={target}")
    return tuple(out)


def _is_prob(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False
