"""A job may run the user's own program instead of the built-in trainer, and a spec stays data: it
names an entrypoint, which each agent's own configuration maps to a script or a module. The spec keys
and their refusals, the agent's ``--entrypoint NAME=MODULE_OR_SCRIPT`` option (through the real
command line), the coordinator sending the name, and the agent's standby pool running one program at
a time; an entrypoint a node does not allow changes nothing on it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from agent.config import AgentConfig
from agent.workers import BUILTIN_PROGRAM, Worker, WorkerGroup
from coordinator import jobspec
from coordinator.config import CoordinatorConfig
from coordinator.controller import Controller
from coordinator.jobspec import JobSpec
from coordinator.store import Store
from diagnostics.bench import coordinator as bc
from diagnostics.daemon_cli import serve_command
from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import agent_pb2, types_pb2
from stanchion.sdk.contract import WorkerPaths
from stanchion.settings import ConfigError
from stanchion.vocab import AgentEventKind, ExitReason

OWN = 'name = "mine"\nnodes = 2\nentrypoint = "own"\n'
TRAINER_SPEC = 'name = "t"\nnodes = 1\n[trainer]\nsteps = 50\n[trainer.data]\npath = "corpus"\n'

# A stand-in for a program built on the SDK, as far as the agent can tell: it records its argv in its
# worker directory, then waits; SIGTERM while waiting is a clean exit (0), as stanchion.join() does.
STANDBY = """\
import json, os, signal, sys
from pathlib import Path
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
d = Path(os.environ["STANCHION_WORKER_DIR"])
(d / "argv.tmp").write_text(json.dumps(sys.argv))
os.replace(d / "argv.tmp", d / "argv.json")
signal.sigwait({signal.SIGTERM})
sys.exit(0)
"""


# ---- the job spec ------------------------------------------------------------------------------


def test_a_spec_names_an_entrypoint_and_its_args() -> None:
    spec = jobspec.parse(OWN + 'args = ["--lr", "3e-4", "--out=x y"]\n')
    assert (spec.entrypoint, spec.args, spec.builtin) == ("own", ("--lr", "3e-4", "--out=x y"), False)
    assert spec.config_json() == "{}"  # no trainer config for a program of its own
    # Neither a data path nor a batch layout is checked: the world of 2 x 4 ranks would not divide
    # the built-in trainer's default batch, and there is no [trainer.data] path.
    assert jobspec.parse(OWN + "workers_per_node = 4\n").workers_per_node == 4
    assert jobspec.parse(OWN + "[trainer]\n").trainer == {}  # an empty table is harmless
    default = jobspec.parse(TRAINER_SPEC)
    assert (default.entrypoint, default.args, default.builtin) == ("trainer", (), True)
    assert (
        jobspec.parse(TRAINER_SPEC.replace("nodes = 1\n", 'nodes = 1\nentrypoint = "trainer"\n')) == default
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            OWN + "[trainer]\nsteps = 5\n",
            "trainer: only the built-in trainer reads [trainer]; pass your program's settings in args",
        ),
        (
            TRAINER_SPEC.replace("nodes = 1\n", 'nodes = 1\nargs = ["--lr", "1"]\n'),
            "args: the built-in trainer takes no args",
        ),
        (OWN.replace('"own"', '"-m"'), "entrypoint: '-m' is not a name"),
        (OWN.replace('"own"', '"a b"'), "entrypoint: 'a b' is not a name"),
        (
            OWN.replace('"own"', '"' + "x" * 64 + '"'),
            "entrypoint: '" + "x" * 64 + "' is not a name: use 1-63 letters",
        ),
        (OWN.replace('"own"', "3"), "entrypoint: expected a string"),
        (OWN + 'args = "--lr 1"\n', "args: expected a list"),
        (OWN + "args = [1]\n", r"args[0]: expected a string, got 1"),
        (OWN + 'args = ["ok", "a\\u0000b"]\n', "args[1]: contains a NUL character"),
        (OWN + "args = [" + ", ".join(['"a"'] * 257) + "]\n", "args: at most 256 entries, got 257"),
        (OWN + 'args = ["' + "a" * 4097 + '"]\n', "args[0]: at most 4096 characters, got 4097"),
    ],
)
def test_each_refusal_names_its_key_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        jobspec.parse(text)
    assert str(e.value).startswith(message.split(":")[0] + ":") and message in str(e.value), str(e.value)


def test_the_limits_themselves_are_accepted() -> None:
    spec = jobspec.parse(OWN + "args = [" + ", ".join(['"' + "a" * 4096 + '"'] * 2) + "]\n")
    assert len(spec.args) == 2 and len(spec.args[0]) == 4096
    assert len(jobspec.parse(OWN + "args = [" + ", ".join(['""'] * 256) + "]\n").args) == 256


@pytest.mark.parametrize(
    "spec",
    [
        JobSpec(name="mine", nodes=2, entrypoint="own", args=("--lr", "3e-4", 'q"u\\o\tte', "é😀\x7f\n", "")),
        JobSpec(name="mine", entrypoint="lm"),
        JobSpec(name="t", nodes=1, trainer={"steps": 50, "data": {"path": "corpus"}}),
        JobSpec(
            name="t",
            straggler_policy="replace",
            bisect_on_suspect=False,
            trainer={"steps": 50, "data": {"path": "c"}},
        ),
    ],
)
def test_a_stored_spec_round_trips(spec: JobSpec) -> None:
    text = jobspec.to_toml(spec)
    assert jobspec.parse(text) == spec
    assert ("entrypoint =" in text) == (not spec.builtin) and ("args =" in text) == bool(spec.args)
    assert ("[trainer]" in text) == spec.builtin  # a program of its own has no trainer table


def test_the_coordinator_sends_the_entrypoint_and_args_in_every_start() -> None:
    c = Controller(CoordinatorConfig(insecure=True), Store(":memory:"))
    for i in range(2):
        c._do_register(agent_pb2.RegisterRequest(node_id=f"sim-{i:05d}", inventory=bc.inventory(i, 1)))
    job = c._do_submit((OWN + 'args = ["--lr", "3e-4"]\n', ""))
    starts = [d.start for rec in c.nodes.values() for d in rec.outbox if d.WhichOneof("kind") == "start"]
    assert len(starts) == 2 and set(job.members) == set(c.nodes)
    for s in starts:
        s = agent_pb2.StartWorkers.FromString(s.SerializeToString())  # as it arrives
        assert (s.entrypoint, list(s.args), s.config_json) == ("own", ["--lr", "3e-4"], "{}")


# ---- the agent's configuration and command line ------------------------------------------------


def script(tmp_path: Path, name: str = "own_loop.py") -> Path:
    path = tmp_path / name
    path.write_text(STANDBY)
    return path


def agent_cfg(tmp_path: Path, *entrypoints: str, **kw: Any) -> AgentConfig:
    return AgentConfig(
        node_id="node-1",
        insecure=True,
        run_root=str(tmp_path / "runs"),
        data_root=str(tmp_path / "data"),
        entrypoints=entrypoints,
        **kw,
    )


def test_agent_entrypoints_map_names_to_absolute_scripts_or_modules(tmp_path: Path, monkeypatch) -> None:
    script(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = agent_cfg(tmp_path, "own=own_loop.py", "lm = mypkg.train_lm", "x_1=m")
    assert cfg.entrypoint_targets() == {
        "own": str(tmp_path / "own_loop.py"),  # relative to where the agent started, stored absolute
        "lm": "mypkg.train_lm",
        "x_1": "m",
    }
    assert agent_cfg(tmp_path).entrypoint_targets() == {}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("own", "expected NAME=MODULE_OR_SCRIPT"),
        ("=mypkg.train", "expected NAME=MODULE_OR_SCRIPT"),
        ("own=", "expected NAME=MODULE_OR_SCRIPT"),
        ("trainer=mypkg.train", "'trainer' is reserved for the built-in trainer"),
        ("-x=mypkg.train", "'-x' is not a name"),
        ("own=missing.py", "no such file"),
        ("own=mypkg/train", "is neither a .py script nor a dotted Python module name"),
        ("own=-c", "is neither a .py script nor a dotted Python module name"),
        ("own=mypkg..train", "is neither a .py script nor a dotted Python module name"),
        ("own=os;rm", "is neither a .py script nor a dotted Python module name"),
    ],
)
def test_a_bad_entrypoint_is_a_config_error_naming_the_option(
    tmp_path: Path, entry: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="^entrypoint: ") as e:
        agent_cfg(tmp_path, entry)
    assert message in str(e.value)


def test_an_entrypoint_name_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^entrypoint: 'own' is given twice"):
        agent_cfg(tmp_path, "own=a.b", "own=c.d")


def test_the_real_command_line_takes_entrypoint_more_than_once(tmp_path: Path, monkeypatch) -> None:
    """`stanchion agent serve --entrypoint A --entrypoint B` through diagnostics.cli, the way the
    daemon starts (the server itself replaced by a recorder)."""
    import agent.daemon
    import diagnostics.commands.agent
    from diagnostics.cli import main

    seen: list[AgentConfig] = []

    async def serve(cfg: AgentConfig, port_file: str = "") -> None:
        seen.append(cfg)

    monkeypatch.setattr(agent.daemon, "serve", serve)
    monkeypatch.setattr(diagnostics.commands.agent, "setup_logging", lambda: None)
    own = script(tmp_path)
    argv = ["agent", "serve", "--insecure", "--node-id", "n0", "--run-root", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--entrypoint", f"own={own}", "--entrypoint", "lm=mypkg.train"])
    assert e.value.code == 0 and seen[-1].entrypoint_targets() == {"own": str(own), "lm": "mypkg.train"}
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and seen[-1].entrypoints == ()
    with pytest.raises(SystemExit) as e:  # a bad one: a usage error naming the option, exit 2
        main([*argv, "--entrypoint", "trainer=mypkg.train"])
    assert e.value.code == 2 and len(seen) == 2


def test_entrypoints_from_the_toml_file_and_the_environment(tmp_path: Path, monkeypatch) -> None:
    seen: list[AgentConfig] = []
    app = typer.Typer(add_completion=False)
    app.command()(serve_command(AgentConfig, lambda cfg, port_file: seen.append(cfg), "d"))
    toml = tmp_path / "agent.toml"
    toml.write_text('node_id = "n0"\ninsecure = true\nentrypoints = ["own=mypkg.own", "lm=mypkg.lm"]\n')
    r = CliRunner().invoke(app, ["--config", str(toml)])
    assert r.exit_code == 0, r.output
    assert seen[-1].entrypoint_targets() == {"own": "mypkg.own", "lm": "mypkg.lm"}
    monkeypatch.setenv("STANCHION_ENTRYPOINTS", '["env=mypkg.env"]')
    r = CliRunner().invoke(app, ["--config", str(toml)])  # the environment wins over the file
    assert r.exit_code == 0, r.output
    assert seen[-1].entrypoint_targets() == {"env": "mypkg.env"}
    r = CliRunner().invoke(app, ["--config", str(toml), "--entrypoint", "flag=mypkg.flag"])  # flags win
    assert r.exit_code == 0, r.output
    assert seen[-1].entrypoint_targets() == {"flag": "mypkg.flag"}


def test_the_local_cluster_starts_its_agents_with_entrypoint_flags(tmp_path: Path, monkeypatch) -> None:
    script(tmp_path)
    monkeypatch.chdir(tmp_path)
    cluster = LocalCluster(tmp_path / "c", entrypoints={"own": "own_loop.py", "lm": "mypkg.train"})
    args = cluster._entrypoint_args()
    assert args == ["--entrypoint", f"own={tmp_path / 'own_loop.py'}", "--entrypoint", "lm=mypkg.train"]
    assert LocalCluster(tmp_path / "d")._entrypoint_args() == []
    seen: list[AgentConfig] = []
    app = typer.Typer(add_completion=False)
    app.command()(serve_command(AgentConfig, lambda cfg, port_file: seen.append(cfg), "d"))
    r = CliRunner().invoke(app, ["--insecure", "--node-id", "n0", *args])
    assert r.exit_code == 0, r.output
    assert seen[-1].entrypoint_targets() == {"own": str(tmp_path / "own_loop.py"), "lm": "mypkg.train"}


# ---- the agent's workers -----------------------------------------------------------------------


def start(
    job_id: str, generation: int, entrypoint: str = "", args: tuple[str, ...] = ()
) -> agent_pb2.Directive:
    return agent_pb2.Directive(
        seq=generation,
        job_id=job_id,
        generation=generation,
        start=agent_pb2.StartWorkers(
            node_rank=0,
            num_nodes=1,
            workers_per_node=1,
            master_addr="127.0.0.1",
            master_port=29500,
            resume="fresh",
            config_json="{}",
            entrypoint=entrypoint,
            args=list(args),
        ),
    )


def test_the_program_of_an_entrypoint(tmp_path: Path) -> None:
    own = script(tmp_path)
    group = WorkerGroup(agent_cfg(tmp_path, f"own={own}", "lm=mypkg.train"))
    assert group.program == BUILTIN_PROGRAM == ("-m", "trainer")  # before any job
    assert group.resolve_program("trainer") == group.resolve_program("") == ("-m", "trainer")
    assert group.resolve_program("own", ["--lr", "1"]) == (str(own), "--lr", "1")
    assert group.resolve_program("lm", ("-c", "x")) == ("-m", "mypkg.train", "-c", "x")
    with pytest.raises(ValueError) as e:
        group.resolve_program("x")
    assert str(e.value) == (
        "entrypoint 'x' is not allowed on node node-1; allowed: trainer, own, lm "
        "(agent serve --entrypoint NAME=MODULE_OR_SCRIPT)"
    )
    with pytest.raises(ValueError, match="the built-in trainer takes no args"):
        group.resolve_program("trainer", ["--steps", "1"])
    own.unlink()
    with pytest.raises(ValueError, match="its script .* no longer exists on node node-1"):
        group.resolve_program("own")


def fake_proc(pid: int) -> Any:
    proc = SimpleNamespace(returncode=None, pid=pid, signals=[])
    proc.send_signal = proc.signals.append
    proc.kill = lambda: proc.signals.append(signal.SIGKILL)
    return proc


def test_a_refused_entrypoint_changes_nothing(tmp_path: Path) -> None:
    group = WorkerGroup(agent_cfg(tmp_path, "lm=mypkg.train"))
    group.job_id, group.generation = "job-1", 2
    ranked = Worker(
        0,
        fake_proc(100),
        WorkerPaths(group.base / "w00000"),
        0.0,
        job_id="job-1",
        slot=0,
        rank=0,
        generation=2,
    )
    ranked.state = types_pb2.WORKER_STATE_TRAINING
    idle = Worker(1, fake_proc(101), WorkerPaths(group.base / "w00001"), 0.0)
    group.workers = [ranked, idle]
    before = (list(group.workers), [vars(w).copy() for w in group.workers], group.job_id, group.generation)
    for d in (start("job-2", 1, "nope"), start("job-1", 3, "nope"), start("job-1", 3, "trainer", ("--x",))):
        with pytest.raises(ValueError, match="nope' is not allowed on node node-1|takes no args"):
            asyncio.run(group.start_generation(d))
    after = (list(group.workers), [vars(w).copy() for w in group.workers], group.job_id, group.generation)
    assert after == before and group.program == BUILTIN_PROGRAM
    assert ranked.proc.signals == [] and idle.proc.signals == []  # nothing stopped
    assert not group.run_root.exists()  # no run directory, no assignment, no stop file written


def test_a_refused_entrypoint_reaches_the_coordinator_as_a_rejected_directive(tmp_path: Path) -> None:
    from agent.daemon import Agent

    a = Agent(agent_cfg(tmp_path))
    asyncio.run(a.apply(start("job-1", 1, "own")))
    (event,) = [e for e in a.outbox if e.kind == AgentEventKind.DIRECTIVE_REJECTED]
    detail = json.loads(event.detail_json)
    assert detail["kind"] == "start" and "entrypoint 'own' is not allowed on node node-1" in detail["error"]
    assert a.group.workers == [] and a.group.job_id == ""


async def until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def argv_of(w: Worker) -> list[str] | None:
    try:
        return json.loads((w.paths.root / "argv.json").read_text())
    except (OSError, ValueError):
        return None


def test_standbys_run_the_current_jobs_program_and_idle_ones_of_another_are_stopped(
    tmp_path: Path, monkeypatch
) -> None:
    """Real processes: a job of a script, then a job of a module. Each job's ranks and standbys run
    its program with its args; the previous program's idle standby gets SIGTERM, exits 0, and its exit
    is a stop the agent asked for (not a lost standby to report or replace with the old program)."""
    own = script(tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "standby_mod.py").write_text(STANDBY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pkg") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    group = WorkerGroup(agent_cfg(tmp_path, f"own={own}", "lm=standby_mod", standby=1, stop_grace_s=30.0))
    trainer_standby = Worker(99, fake_proc(4242), WorkerPaths(group.base / "w00099"), 0.0)
    group.workers.append(trainer_standby)  # an idle built-in trainer standby from before any job

    async def main() -> None:
        try:
            await group.start_generation(start("job-1", 1, "own", ("--lr", "3e-4")))
            # The built-in trainer's idle standby was asked to stop; it is never handed a slot.
            assert trainer_standby.stopping and trainer_standby.proc.signals == [signal.SIGTERM]
            group.workers.remove(trainer_standby)
            first = list(group.workers)
            assert [w.slot for w in first] == [0, None]
            await until(lambda: all(argv_of(w) for w in first), 60, "both processes to start")
            for w in first:
                assert w.program == (str(own), "--lr", "3e-4") and argv_of(w) == [str(own), "--lr", "3e-4"]
                assert w.proc.returncode is None
            old_standby = first[1]

            await group.start_generation(start("job-2", 1, "lm", ("x",)))
            assert group.program == ("-m", "standby_mod", "x")
            new = [w for w in group.workers if w not in first]
            assert [w.slot for w in new] == [0, None]  # the old program's standby took no slot
            await until(lambda: all(argv_of(w) for w in new), 60, "the new program's processes")
            for w in new:
                assert w.program == ("-m", "standby_mod", "x")
                assert argv_of(w) == [str(tmp_path / "pkg" / "standby_mod.py"), "x"]
            assert old_standby.stopping
            await until(lambda: old_standby.proc.returncode is not None, 30, "the old standby to exit")
            assert old_standby.proc.returncode == 0
            exits = [(k, w, rec) for k, w, rec in group.poll() if k == AgentEventKind.WORKER_EXITED]
            (kind, w, rec), *_ = [e for e in exits if e[1] is old_standby]
            assert rec["reason"] == ExitReason.STOPPED and w.slot is None
            assert old_standby not in group.workers
            await group.ensure_standbys()  # nothing to replace: the current program's standby is there
            assert [w for w in group.workers if w.slot is None and w.alive] == [new[1]]
        finally:
            await group.shutdown(10.0)

    asyncio.run(main())


def test_a_trainer_job_after_a_program_job_retires_the_programs_standbys(tmp_path: Path) -> None:
    """Back to the built-in trainer (fake processes: no torch here)."""
    group = WorkerGroup(agent_cfg(tmp_path, "lm=mypkg.train", standby=0))
    group.program = ("-m", "mypkg.train")
    lm_standby = Worker(0, fake_proc(7), WorkerPaths(group.base / "w00000"), 0.0, program=group.program)
    ready_trainer = Worker(1, fake_proc(8), WorkerPaths(group.base / "w00001"), 0.0, ready=True)
    group.workers = [lm_standby, ready_trainer]
    assert group._take_standby() is lm_standby  # the warm one runs another program: never taken

    async def use_the_trainer() -> None:
        group._use_program(BUILTIN_PROGRAM)

    asyncio.run(use_the_trainer())
    assert group.program == BUILTIN_PROGRAM
    assert lm_standby.stopping and lm_standby.proc.signals == [signal.SIGTERM]
    assert not ready_trainer.stopping and group._take_standby() is ready_trainer
    for code in (0, -signal.SIGTERM):  # exit 0 while waiting, or the signal itself while importing
        lm_standby.proc.returncode = code
        assert group._classify_exit(lm_standby)["reason"] == ExitReason.STOPPED


def test_a_node_refusing_the_jobs_program_fails_the_job_at_once_naming_why() -> None:
    """A refused start never produces a rank: the job fails with the node's error as its reason
    instead of escalating past a first-step deadline and leaving a healthy node out."""
    import json as _json

    from coordinator import machine as m
    from coordinator.config import CoordinatorConfig
    from coordinator.controller import Controller
    from coordinator.store import Store
    from protos.stanchion.v1 import types_pb2
    from stanchion.vocab import AgentEventKind, ExitReason

    error = "entrypoint 'own' is not allowed on node node-b; allowed: trainer (agent serve --entrypoint NAME=MODULE_OR_SCRIPT)"
    controller = Controller(CoordinatorConfig(insecure=True), Store(":memory:"))

    def rejected(kind: str) -> object:
        detail = {"kind": kind, "error": error}
        ev = types_pb2.Event(
            kind=AgentEventKind.DIRECTIVE_REJECTED, generation=1, detail_json=_json.dumps(detail)
        )
        return controller._machine_event("node-b", ev, detail)

    assert rejected("rollback") is None  # only a refused launch means no rank will come
    failed = rejected("start")
    assert failed == m.WorkerFailed("node-b", 1, -1, ExitReason.CONFIG, error)
    spec = jobspec.parse('name = "own"\nnodes = 2\nentrypoint = "own"\n')
    nodes = {n: m.NodeView(n, store_port=1000 + i) for i, n in enumerate(("node-a", "node-b"))}
    job = m.step(m.new_job("j", spec, 0.0), m.Submitted(), nodes, 0.0).job
    d = m.step(job, failed, nodes, 1.0)
    assert d.job.state is m.JobState.FAILED and d.reason.endswith(
        f"node-b rejected the job's configuration: {error}"
    )


def test_a_standby_of_the_builtin_trainer_is_hinted_at_the_running_jobs_config(tmp_path, monkeypatch):
    """So that it builds that job's model while it waits (trainer/cli.py ``prepare``)."""
    launched: list[tuple[tuple[str, ...], dict[str, str]]] = []

    async def exec_(python: str, *argv: str, env: dict[str, str], **_: Any) -> Any:
        launched.append((argv, env))
        return SimpleNamespace(pid=1000 + len(launched))

    monkeypatch.setattr(asyncio, "create_subprocess_exec", exec_)
    monkeypatch.setenv("STANCHION_STANDBY_CONFIG", "/stale/from/the/agents/own/environment.json")
    script = tmp_path / "own.py"
    script.write_text("")
    group = WorkerGroup(
        AgentConfig(
            node_id="n1", insecure=True, run_root=str(tmp_path / "runs"), entrypoints=(f"own={script}",)
        )
    )
    asyncio.run(group.spawn())  # no job has run here yet: nothing to hint at
    group.config_path = tmp_path / "runs" / "job" / "trainer-config.json"
    asyncio.run(group.spawn())  # the built-in trainer while a job runs: its config
    group.program = group.resolve_program("own")
    asyncio.run(group.spawn())  # a user's program builds itself: no hint
    hints = [(argv, env.get("STANCHION_STANDBY_CONFIG")) for argv, env in launched]
    assert hints == [
        (BUILTIN_PROGRAM, None),
        (BUILTIN_PROGRAM, str(group.config_path)),
        ((str(script),), None),
    ]
