"""Job specs: what an operator submits (`stanchion job submit SPEC.toml`).

```toml
name = "demo"
nodes = 2                  # data-parallel nodes wanted
min_nodes = 1              # shrink data parallelism down to this many when no spare is left
workers_per_node = 1

[trainer]                  # a trainer config (trainer/config.py): preset plus overrides
preset = "tiny"
steps = 300
[trainer.data]
path = "data/sotu"         # relative to the agents' data root
```

Your own training program instead of the built-in trainer::

    name = "mine"
    nodes = 2
    entrypoint = "own"           # a name each agent maps to a module or script (--entrypoint own=...)
    args = ["--lr", "3e-4"]      # passed to that program; no [trainer] table

A spec is data only: it cannot name a command or an output directory (agents choose the run
directory under their own run root), and paths must stay inside the agents' data root. It names an
entrypoint, and each agent's own configuration decides what that name runs (an agent refuses a name
it was not given); ``args`` are arguments of that program, never a command line. The fault schedule
is a test and chaos facility: a list validated entry by entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from stanchion import settings
from stanchion.identity import NODE_ID_RE
from stanchion.settings import ConfigError, require
from trainer import config as trainer_config

NAME_RE = NODE_ID_RE  # job names follow the node-id rules
MAX_SPEC_BYTES = 64 * 1024
TRAINER = "trainer"  # the built-in trainer's entrypoint name (agents reserve it)
MAX_ARGS = 256
MAX_ARG_CHARS = 4096


@dataclass(frozen=True)
class JobSpec:
    name: str = "job"
    nodes: int = 2
    min_nodes: int = 1
    workers_per_node: int = 1
    max_restarts: int = 50
    max_restarts_without_progress: int = 3
    rendezvous_timeout_s: float = 600.0
    # A generation must complete its first step within this; 0 derives it from the job's own launches
    # (machine.first_step_deadline_s). When it does not, the recovery escalates one rung.
    first_step_timeout_s: float = 0.0
    skip_batches: int = 8  # batches skipped when an anomaly recurs at the same data (PaLM: 200-500)
    hardware_horizon_steps: int = (
        500  # a replayed anomaly that recurs at other data within this many steps suggests hardware
    )
    bisect_on_suspect: bool = True
    # A rank that reports itself a straggler (integrity.straggler_*): "report" records it (job explain,
    # metrics); "replace" also starts a new generation with a spare in its node's place, if one is ready.
    straggler_policy: str = "report"
    faults: tuple[dict[str, Any], ...] = ()
    # The program the ranks run: "trainer" (the built-in one, configured by [trainer]) or a name each
    # agent maps to a module or script of its own (agent serve --entrypoint NAME=MODULE_OR_SCRIPT).
    entrypoint: str = TRAINER
    args: tuple[str, ...] = ()  # that program's arguments (never a command: the agent picks the program)
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            bool(NAME_RE.match(self.name)),
            "name",
            "use 1-63 letters, digits, '.', '_' or '-', starting alphanumeric",
        )
        require(1 <= self.nodes <= 4096, "nodes", "must be between 1 and 4096")
        require(1 <= self.min_nodes <= self.nodes, "min_nodes", f"must be between 1 and nodes={self.nodes}")
        require(1 <= self.workers_per_node <= 64, "workers_per_node", "must be between 1 and 64")
        require(0 <= self.max_restarts <= 10_000, "max_restarts", "must be between 0 and 10000")
        require(
            1 <= self.max_restarts_without_progress <= 1000,
            "max_restarts_without_progress",
            "must be 1..1000",
        )
        require(
            1 <= self.rendezvous_timeout_s <= 86_400, "rendezvous_timeout_s", "must be between 1 and 86400"
        )
        require(
            self.first_step_timeout_s == 0 or 1 <= self.first_step_timeout_s <= 86_400,
            "first_step_timeout_s",
            "must be 0 (derived from the job's own launches) or between 1 and 86400",
        )
        require(1 <= self.skip_batches <= 100_000, "skip_batches", "must be between 1 and 100000")
        require(self.hardware_horizon_steps >= 1, "hardware_horizon_steps", "must be >= 1")
        require(
            self.straggler_policy in ("report", "replace"),
            "straggler_policy",
            f"expected 'report' or 'replace', got {self.straggler_policy!r}",
        )
        require(len(self.faults) <= 10_000, "faults", "at most 10000 entries")
        require(
            isinstance(self.entrypoint, str) and bool(NAME_RE.match(self.entrypoint)),
            "entrypoint",
            f"{self.entrypoint!r} is not a name: use 1-63 letters, digits, '.', '_' or '-', starting "
            f"alphanumeric ({TRAINER!r} for the built-in trainer, or a name the agents map to your "
            "program with `agent serve --entrypoint NAME=MODULE_OR_SCRIPT`)",
        )
        require(
            len(self.args) <= MAX_ARGS,
            "args",
            f"at most {MAX_ARGS} entries, got {len(self.args)}; pass a config file instead",
        )
        for i, arg in enumerate(self.args):
            require(isinstance(arg, str), f"args[{i}]", f"expected a string, got {arg!r}")
            require(
                len(arg) <= MAX_ARG_CHARS,
                f"args[{i}]",
                f"at most {MAX_ARG_CHARS} characters, got {len(arg)}; pass a file name instead",
            )
            require("\x00" not in arg, f"args[{i}]", "contains a NUL character, which no argument can hold")
        if self.builtin:
            require(
                not self.args,
                "args",
                "the built-in trainer takes no args: set its options in [trainer], or name your own "
                'program with entrypoint = "NAME"',
            )
        else:
            require(
                not self.trainer,
                "trainer",
                "only the built-in trainer reads [trainer]; pass your program's settings in args",
            )

    @property
    def builtin(self) -> bool:
        """The job runs the built-in trainer (configured by [trainer]), not a program of its own."""
        return self.entrypoint == TRAINER

    def train_config(self) -> trainer_config.TrainConfig:
        """The resolved trainer config (validated; unknown keys name themselves)."""
        t = dict(self.trainer)
        preset = t.pop("preset", "tiny")
        if not isinstance(preset, str):  # resolve() looks it up in a dict: a table would raise TypeError
            raise ConfigError(f"trainer.preset: expected a preset name, got {preset!r}")
        try:
            return trainer_config.resolve(preset, overrides={**t, "preset": preset})
        except ConfigError as e:
            raise ConfigError(_under_trainer(str(e))) from None

    def config_json(self) -> str:
        """The resolved trainer config for the ranks; "{}" for a program of the job's own."""
        if not self.builtin:
            return "{}"
        return json.dumps(trainer_config.to_dict(self.train_config()), sort_keys=True)

    def world_size(self, nodes: int) -> int:
        return nodes * self.workers_per_node


def parse(text: str) -> JobSpec:
    """Parse and validate a TOML job spec."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise ConfigError(f"spec: {len(text.encode())} bytes is larger than the {MAX_SPEC_BYTES}-byte limit")
    try:
        data = settings.tomllib.loads(text)
    except settings.tomllib.TOMLDecodeError as e:
        raise ConfigError(f"spec: not valid TOML: {e}") from None
    if "faults" in data:
        from stanchion.sdk import faults

        try:
            faults.parse(data["faults"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    spec = settings.build(JobSpec, data)
    if not spec.builtin:  # a program of the job's own: [trainer], its data path and layout do not apply
        return spec
    cfg = spec.train_config()
    check_data_path(cfg.data.path)
    for n in range(spec.min_nodes, spec.nodes + 1):  # the full size must divide; smaller ones may not
        try:
            cfg.check_world(spec.world_size(n))
        except ConfigError as e:
            if n == spec.nodes:
                raise ConfigError(f"trainer.{e}") from None
    return spec


def _under_trainer(message: str) -> str:
    """A trainer-config error as a job-spec error: its key moves under ``trainer.``."""
    if message.startswith("unknown key '"):  # settings.build: "unknown key 'data.x' in [data]; ..."
        return message.replace("unknown key '", "unknown key 'trainer.", 1).replace(
            " in [", " in [trainer.", 1
        )
    return f"trainer.{message}"


def check_data_path(path: str) -> None:
    """A job may read data only inside the agents' data root: a relative path without '..'."""
    if not path:
        raise ConfigError("trainer.data.path: required (a directory under the agents' data root)")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path or "\x00" in path:
        raise ConfigError(
            f"trainer.data.path: {path!r} must be a relative path inside the agents' data root, without '..'"
        )


def to_toml(spec: JobSpec) -> str:
    """A canonical TOML rendering of a spec (stored with the job and shown by `job status --json`)."""
    lines = []
    for key in (
        "name",
        "nodes",
        "min_nodes",
        "workers_per_node",
        "max_restarts",
        "max_restarts_without_progress",
        "rendezvous_timeout_s",
        "first_step_timeout_s",
        "skip_batches",
        "hardware_horizon_steps",
        "bisect_on_suspect",
        "straggler_policy",
    ):
        lines.append(f"{key} = {json.dumps(getattr(spec, key))}")
    if not spec.builtin:
        lines.append(f"entrypoint = {json.dumps(spec.entrypoint)}")
    if spec.args:
        lines.append(f"args = {_toml_value(list(spec.args))}")
    if spec.faults:
        lines.append(f"faults = {_toml_value(list(spec.faults))}")
    if spec.builtin or spec.trainer:
        lines.append("")
        _table(lines, "trainer", spec.trainer)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], name: str, data: dict[str, Any]) -> None:
    lines.append(f"[{name}]")
    nested = []
    for k, v in data.items():
        if isinstance(v, dict):
            nested.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in nested:
        lines.append("")
        _table(lines, f"{name}.{k}", v)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return '""'
    if isinstance(v, str):
        # A TOML basic string: JSON's escapes are TOML's, but not JSON's surrogate pairs for characters
        # beyond the BMP, so keep those literal; DEL must be escaped in TOML and JSON leaves it.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    return json.dumps(v)
