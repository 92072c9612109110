"""`stanchion bench report`: docs/benchmarks.md and its figures, regenerated from docs/bench/*.json.

Every section shows the command that produced its JSON above its tables, the tables generated from
the JSON, and the hand-written explanations, which are Markdown files in diagnostics/bench/text/
(:func:`prose`). Commentary that quotes figures of one particular run carries the ``finished_at``
of the JSON it was written for (the first line of its file, ``<!-- written for: ... -->``): when
the JSON is regenerated, the document says so above the commentary instead of silently pairing
old words with new numbers. Likewise a figure whose code changed after the commit its JSON records
(``MEASURED_CODE``: ``git diff`` from that commit to the working tree) is marked stale where it is
shown, and in the goals table. Figures (matplotlib, Agg backend) are written next to the JSON files.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# The bisection JSON is written by `stanchion diag bisect`, which does not record its command.
BISECT_COMMAND = "stanchion diag bisect --local-nodes 8 --defect 5 --json docs/bench/bisect.json"
NOT_MEASURED = "Not measured yet."

# The code each benchmark's figures describe (paths of this repository, besides the benchmarks'
# shared diagnostics/bench/common.py): a change to any of them after the commit a JSON records
# makes its figures stale. Keyed by the JSON's "benchmark" field, else its file name's first word.
_CLUSTER = ("stanchion", "trainer", "agent", "coordinator", "protos", "diagnostics/localcluster.py")
_TORCHFT = ("diagnostics/bench/torchft.py", "diagnostics/bench/torchft_worker.py")
MEASURED_CODE: dict[str, tuple[str, ...]] = {
    "trainer": ("stanchion", "trainer", "diagnostics/bench/trainer.py"),
    "sdk": ("stanchion", "examples", "diagnostics/bench/sdk.py", "diagnostics/bench/sdk_worker.py"),
    "integrity": ("stanchion", "trainer", "diagnostics/bench/integrity.py"),
    # torchft, the peer both run: its launcher and its worker
    "recovery": (*_CLUSTER, "diagnostics/bench/recovery.py", *_TORCHFT),
    "agent-restart": (*_CLUSTER, "diagnostics/bench/agent_restart.py", "diagnostics/bench/recovery.py"),
    "standby": ("stanchion", "trainer", "agent/workers.py", "diagnostics/bench/standby.py"),
    "checkpoint": (
        "stanchion/sdk/checkpoint.py",
        "stanchion/sdk/fingerprint.py",
        "diagnostics/bench/checkpoint.py",
    ),
    "coordinator": ("coordinator", "protos", "diagnostics/bench/coordinator.py"),
    "goodput": (*_CLUSTER, "diagnostics/bench/goodput.py", "diagnostics/bench/recovery.py", *_TORCHFT),
    "chaos": (*_CLUSTER, "diagnostics/up.py"),  # chaos-drill.json: `stanchion up`
    "bisect": ("coordinator", "agent", "trainer/trial.py", "diagnostics/commands/diag.py"),
}
BENCH_COMMON = ("diagnostics/bench/common.py",)


def changed_since(commit: str, paths: Sequence[str]) -> list[str] | None:
    """Files under ``paths`` that differ between ``commit`` and the working tree; None when git
    cannot tell (no git, or a clone without that commit)."""
    from diagnostics.bench.common import REPO

    try:
        out = subprocess.run(
            ["git", "diff", "--name-only", commit, "--", *paths],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split() if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# Formatting


def sig_text(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, halves rounded up, trailing zeros kept (0.190)."""
    from decimal import ROUND_HALF_UP, Decimal

    if x == 0:
        return "0"
    d = Decimal(repr(x))
    exp = d.adjusted() - digits + 1
    q = d.quantize(Decimal(1).scaleb(exp), rounding=ROUND_HALF_UP)
    if q.adjusted() > d.adjusted():  # 9.995 -> 10.0: one digit fewer after the point
        q = d.quantize(Decimal(1).scaleb(exp + 1), rounding=ROUND_HALF_UP)
    return f"{q:f}"


def fmt(x: Any, spec: str = ".3g") -> str:
    """A figure for a table: ``N g`` specs keep N significant digits (halves up, trailing zeros
    kept); other specs are Python format specs; None is a dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if spec.endswith("g") and isinstance(x, int):
            return str(x)
        if spec.endswith("g") and spec[1:-1].isdigit():
            return sig_text(x, int(spec[1:-1]))
        return format(x, spec).replace("-", "−")
    return str(x)


def natural(x: Any) -> str:
    """A figure as Python writes it at 4 significant digits (no trailing zeros); None is a dash."""
    if isinstance(x, float):
        text = format(x, ".4g")
        return text if any(c in text for c in ".en") else text + ".0"
    return fmt(x)


def pct(x: float | None, signed: bool = True, digits: int = 1) -> str:
    if x is None:
        return "–"
    text = f"{100 * x:+.{digits}f}%" if signed else f"{100 * x:.{digits}f}%"
    return text.replace("-", "−")


def params_text(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e8 else f"{n / 1e6:.3g}M"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return out


def command_block(command: str) -> list[str]:
    return ["```", command, "```", ""]


def finished_line(d: Mapping[str, Any]) -> str:
    src = d.get("source") or {}
    commit = (src.get("commit") or "")[:7] or "unknown"
    dirty = src.get("modified_files")
    load = (d.get("machine") or {}).get("load_average_1_5_15") or {}
    start, end = load.get("at_start"), load.get("at_end")
    when = utc_minute(str(d.get("finished_at", "?")))
    text = f"Run finished {when} at commit `{commit}`"
    if dirty:
        text += f" ({dirty} modified tracked file(s) in the tree)"
    if start or end:
        text += f"; load average (1 min) {fmt(start[0] if start else None)} at the start, {fmt(end[0] if end else None)} at the end"
    return text + "." + stale_text(d)


def stale_text(d: Mapping[str, Any]) -> str:
    """`` **Stale:** why`` for a JSON whose figures may no longer describe the code (see Report.load)."""
    return f" **Stale:** {d['_stale']}." if d.get("_stale") else ""


def utc_minute(stamp: str) -> str:
    """``2026-11-27T12:53:48+0000`` -> ``2026-11-27 12:53 UTC``."""
    from datetime import datetime, timezone

    try:
        t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").astimezone(timezone.utc)
    except ValueError:
        return stamp
    return t.strftime("%Y-%m-%d %H:%M UTC")


def prose(name: str) -> str:
    """The hand-written Markdown of diagnostics/bench/text/NAME.md, exactly as written (the bisection
    texts name figures in braces, which their section fills in with ``str.format``)."""
    return resources.files("diagnostics.bench").joinpath("text", f"{name}.md").read_text(encoding="utf-8")


WRITTEN_FOR = re.compile(r"<!-- written for: (\S+) -->\n")


@dataclass
class Commentary:
    """Hand-written text about one recorded run; ``written_for`` is that JSON's ``finished_at``."""

    written_for: str
    text: str
    key: str = "finished_at"  # the JSON field that identifies the run

    @classmethod
    def load(cls, name: str) -> Commentary:
        """text/NAME.md, whose first line names the run: ``<!-- written for: FINISHED_AT -->``."""
        body = prose(name)
        m = WRITTEN_FOR.match(body)
        if m is None:
            raise ValueError(f"text/{name}.md: the first line must be <!-- written for: FINISHED_AT -->")
        return cls(m.group(1), body[m.end() :])

    def render(self, d: Mapping[str, Any]) -> list[str]:
        out = []
        if d.get(self.key) != self.written_for:
            out += [
                f"*The commentary below was written for the run with {self.key} {self.written_for}; the "
                f"tables above come from the run with {self.key} {d.get(self.key)}. Read it against them.*",
                "",
            ]
        return out + [self.text.strip(), ""]


@dataclass
class Report:
    bench_dir: Path
    out: Path
    figures: list[Path] = field(default_factory=list)
    changes: Callable[[str, Sequence[str]], list[str] | None] = changed_since

    def load(self, name: str) -> dict[str, Any] | None:
        """The JSON, with ``_stale`` added: why its figures may not describe the code any more
        (None: they do)."""
        path = self.bench_dir / name
        if not path.is_file():
            return None
        d = json.loads(path.read_text())
        d["_stale"] = self.staleness(d, name)
        return d

    def staleness(self, d: Mapping[str, Any], name: str) -> str | None:
        kind = d.get("benchmark") or re.split(r"[-.]", name)[0]
        commit = (d.get("source") or {}).get("commit")
        if not commit:
            return "the commit it measured is not recorded"
        changed = self.changes(commit, (*MEASURED_CODE.get(kind, (".",)), *BENCH_COMMON))
        if changed is None:
            return f"git cannot compare commit `{commit[:7]}` with this tree"
        if not changed:
            return None
        shown = ", ".join(f"`{f}`" for f in changed[:3]) + (
            f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        return f"code it measures changed after commit `{commit[:7]}`: {shown}"

    def link(self, png: Path) -> str:
        return os.path.relpath(png, self.out.parent)


# ---------------------------------------------------------------------------------------------
# Fixed text: the hand-written prose is diagnostics/bench/text/NAME.md, loaded by prose()

INTRO = prose("intro")
HOW_TO_READ = prose("how_to_read")

MACHINE_FIXED = [
    ("memory", "23.5 GiB"),
    ("threads", "1 torch thread per rank (`threads = 1`, `OMP_NUM_THREADS=1`), 2 ranks"),
    (
        "data",
        "the `sotu` corpus prepared with vocab 2048 (`stanchion data prepare --corpus sotu --vocab-size 2048 "
        "--out /tmp/sotu-data`)",
    ),
]

TRAINER_WHAT_RUNS = prose("trainer_what_runs")
TRAINER_SHARDED_WHAT_RUNS = prose("trainer_sharded_what_runs")
TRAINER_MEANING = Commentary.load("trainer_meaning")
INTEGRITY_A = prose("integrity_a")
INTEGRITY_A_MEANING = Commentary.load("integrity_a_meaning")
INTEGRITY_B = prose("integrity_b")
INTEGRITY_B_AFTER = prose("integrity_b_after")
INTEGRITY_B_MEANING = Commentary.load("integrity_b_meaning")
RECOVERY_WHAT_RUNS = prose("recovery_what_runs")
GOODPUT_WHAT_RUNS = prose("goodput_what_runs")
SDK_WHAT_RUNS = prose("sdk_what_runs")
AGENT_RESTART_WHAT_RUNS = prose("agent_restart_what_runs")
AGENT_RESTART_MEANING = Commentary.load("agent_restart_meaning")
STANDBY_WHAT_RUNS = prose("standby_what_runs")
STANDBY_MEANING = Commentary.load("standby_meaning")
CHECKPOINT_WHAT_RUNS = prose("checkpoint_what_runs")
CHECKPOINT_MEANING = Commentary.load("checkpoint_meaning")
SDK_MEANING = Commentary.load("sdk_meaning")
GPU_TEXT = prose("gpu_what_runs").strip() + "\n\n" + NOT_MEASURED


# ---------------------------------------------------------------------------------------------
# Sections


def goals_section(rep: Report, docs: Mapping[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, d in docs.items():
        label = f"{name} (stale)" if d.get("_stale") else name
        for g in d.get("goals", []):
            met = {True: "**met**", False: "**not met**", None: "–"}[g.get("met")]
            rows.append([label, g["goal"], fmt(g.get("value"), ".4g"), g.get("target", ""), met])
    if not rows:
        return []
    return ["## Goals at a glance", "", *table(["benchmark", "goal", "value", "target", "met"], rows), ""]


def machine_section(docs: Mapping[str, dict[str, Any]]) -> list[str]:
    m = next((d["machine"] for d in docs.values() if d.get("machine")), None)
    if m is None:
        return []
    rows = [
        (
            "CPU",
            f"{m.get('cpu_model')} (the model name `/proc/cpuinfo` reports), {m.get('logical_cores')} logical "
            f"cores, {m.get('usable_cores')} usable",
        ),
        ("software", f"torch {m.get('torch')}, Python {m.get('python')}, {m.get('platform')}, gloo"),
        *MACHINE_FIXED,
        (
            "dates",
            ", ".join(
                sorted({str(d.get("finished_at", ""))[:10] for d in docs.values() if d.get("finished_at")})
            ),
        ),
    ]
    return ["## Machine", "", *table(["", ""], rows), ""]


# `bench trainer` per layout: (JSON, the baseline's key in it, its name as shown).
TRAINER_RUNS = (
    ("trainer.json", "ddp", "DDP"),
    ("trainer-fsdp.json", "fsdp", "FSDP2"),
    ("trainer-hsdp.json", "hsdp", "HSDP"),
)


def per_round(ratios: Sequence[float | None]) -> str:
    """Ratios of the rounds in order, as a table cell or a sentence shows them."""
    return " / ".join(fmt(x, ".3f") for x in ratios)


def trainer_section(rep: Report) -> list[str]:
    out: list[str] = []
    for name, base, shown_as in TRAINER_RUNS:
        out += trainer_run_section(rep, name, base, shown_as)
    return out


def trainer_run_section(rep: Report, name: str, base: str, shown_as: str) -> list[str]:
    d = rep.load(name)
    out = [f"## Trainer: Stanchion beside plain {shown_as}", ""]
    if d is None:
        nproc = " --nproc 4" if base == "hsdp" else ""  # 2 replica groups of 2 shards
        how = f"stanchion bench trainer --preset gpt2-124m --parallel {base}{nproc} --json --out docs/bench/{name}"
        return out + [f"{NOT_MEASURED} `{how}`", ""]
    r = d["results"]
    mm = r["matmul"]
    out += command_block(d["command"]) + [TRAINER_WHAT_RUNS if base == "ddp" else TRAINER_SHARDED_WHAT_RUNS]
    out.append(
        finished_line(d)
        + f" Matmul: {mm['flops_per_s_per_rank_before'] / 1e9:.1f} GFLOP/s per rank before the runs, "
        f"{mm['flops_per_s_per_rank_after'] / 1e9:.1f} after; **peak = {mm['ranks']} × "
        f"{max(mm['flops_per_s_per_rank_before'], mm['flops_per_s_per_rank_after']) / 1e9:.1f} = "
        f"{mm['peak_flops_per_s'] / 1e9:.1f} GFLOP/s**."
    )
    out.append("")
    rows, ratios, due_lines, attribution_lines = [], [], [], []
    order = [p for p in d["settings"].get("presets", []) if p in r["presets"]]
    for preset in order + [p for p in r["presets"] if p not in order]:
        e = r["presets"][preset]
        c = e["config"]
        reduced = " reduced" if any("reduced for CPU" in n for n in c.get("notes", [])) else ""
        label = (
            f"{preset}{reduced} ({params_text(c['params'])}, {c['flops_per_token'] / 1e6:.3g} MFLOP/token, "
            f"{c['tokens_per_step']:,} tokens/step; {e['stanchion']['steps_measured']} steps)"
        )
        systems = [("stanchion", "Stanchion"), (base, shown_as)]
        if "stanchion-off" in e:
            systems.append(("stanchion-off", "Stanchion, protections off"))
        for i, (system, label_) in enumerate(systems):
            s = e[system]
            st = s["step_time_s"]
            rows.append(
                [
                    label if i == 0 else "",
                    label_,
                    fmt(st["median"]),
                    fmt(st["p10"]),
                    fmt(st["amortized"]),
                    " / ".join(fmt(x["median_step_time_s"]) for x in s["runs"]),
                    f"{s['tokens_per_s']:,.3g}" if s["tokens_per_s"] < 1000 else f"{s['tokens_per_s']:,.0f}",
                    fmt(s["model_flops_per_s"] / 1e9),
                    pct(s["flop_utilization"], signed=False),
                ]
            )
        vs = e[f"stanchion_vs_{base}"]
        ratios.append(
            [
                preset + reduced,
                per_round(vs["step_time_ratio_per_round"]),
                f"**{fmt(vs['step_time_ratio_median_of_rounds'], '.3f')}**",
                fmt(vs["step_time_ratio_median"], ".3f"),
                fmt(vs["step_time_ratio_p10"], ".3f"),
                fmt(vs["step_time_ratio_amortized"], ".3f"),
            ]
        )
        a = e.get("attribution")
        if a:
            attribution_lines.append(
                f"{preset}{reduced}: Stanchion with its protections off ÷ plain {shown_as} "
                f"**{fmt(a[f'off_vs_{base}'], '.3f')}** (rounds {per_round(a[f'off_vs_{base}_per_round'])}): "
                f"the SDK's own step machinery; Stanchion at its defaults ÷ protections off "
                f"**{fmt(a['defaults_vs_off'], '.3f')}** (rounds {per_round(a['defaults_vs_off_per_round'])}): "
                "the protections' own work ("
                + ", ".join(f"`{k}={str(v).lower()}`" for k, v in a["protections_off"].items())
                + " turns them off)"
            )
        due = e["stanchion"].get("due", {})
        if due:
            parts = ", ".join(
                f"{v['steps']} {k.replace('+', ' + ')} steps at {fmt(v['median_s'])} s"
                for k, v in due.items()
            )
            due_lines.append(
                f"{preset}: {parts}, against a median step of {fmt(e['stanchion']['step_time_s']['median'])} s "
                f"(`overhead_within_run` {pct(e['stanchion']['overhead_within_run'], signed=False)})"
            )
    rounds = d["settings"].get("rounds", 3)
    out += table(
        [
            "preset",
            "system",
            "median step s",
            "p10 s",
            "amortized s",
            f"run medians s (rounds {'/'.join(str(i + 1) for i in range(rounds))})",
            "tokens/s (median)",
            "model GFLOP/s",
            "of peak",
        ],
        rows,
    ) + [""]
    out += table(
        [
            "preset",
            f"Stanchion ÷ {shown_as} step time: per round ({'/'.join(str(i + 1) for i in range(rounds))})",
            "median of rounds",
            "pooled median",
            "p10",
            "amortized",
        ],
        ratios,
    ) + [""]
    if attribution_lines:
        out += [
            "Where the ratio goes, measured in the same rounds: " + "; ".join(attribution_lines) + ".",
            "",
        ]
    if due_lines:
        out += ["Stanchion's due steps, within its own runs: " + "; ".join(due_lines) + ".", ""]
    return out + (TRAINER_MEANING.render(d) if base == "ddp" else [])


SDK_RUNS = ("sdk.json", "sdk-large.json")  # the recorded size, then 4x its batch


def sdk_config_label(name: str) -> str:
    if name == "plain":
        return "plain (DDP)"
    if name == "guarded":
        return "**guarded, all defaults**"
    return "guarded, " + ", ".join(f"`{kv}`" for kv in name.removeprefix("guarded ").split(","))


def sdk_section(rep: Report) -> list[str]:
    out = ["## SDK: a user's own loop, guarded beside plain DDP", ""]
    runs = [d for d in (rep.load(name) for name in SDK_RUNS) if d is not None]
    if not runs:
        return out + [NOT_MEASURED, ""]
    out += [SDK_WHAT_RUNS.strip(), ""]
    for d in runs:
        r, m = d["results"], d["results"]["model"]
        out += command_block(d["command"])
        out += [
            finished_line(d)
            + f" Model: {params_text(m['params'])} parameters, {m['sequences_per_step_per_rank']:,} sequences "
            f"of {m['context']} tokens per rank and step ({m['batch_size']} × {m['accum']} micro-batches).",
            "",
        ]
        rows = []
        for name, c in r["configs"].items():
            st, vs = c["step_time_s"], c.get("vs_plain") or {}
            per_round = " / ".join(fmt(x, ".4g") for x in vs.get("ratio_per_round", [])) or "–"
            rows.append(
                [
                    sdk_config_label(name),
                    fmt(st["median"], ".4g"),
                    fmt(st["p10"], ".4g"),
                    fmt(vs.get("ratio_median"), ".4g") if vs else "–",
                    per_round,
                    fmt(vs.get("ratio_median_of_rounds"), ".4g") if vs else "–",
                ]
            )
        out += table(
            ["configuration", "median step s", "p10 s", "÷ plain (median)", "per round", "median of rounds"],
            rows,
        )
        out += [
            "",
            f"**ratio = guarded ÷ plain median step time = {fmt(r['guarded_median_s'], '.4g')} / "
            f"{fmt(r['plain_median_s'], '.4g')} = {d['ratio']:.4f}**",
            "",
        ]
        out += goals_lines(d)
    return out + SDK_MEANING.render(runs[0])


def integrity_section(rep: Report) -> list[str]:
    d = rep.load("integrity.json")
    out = ["## Integrity: fingerprint throughput and the cost of the protections", ""]
    if d is None:
        return out + [NOT_MEASURED, ""]
    r = d["results"]
    out += command_block(d["command"]) + [
        finished_line(d),
        "",
        "### (a) Checksum throughput",
        "",
        INTEGRITY_A,
    ]
    t = r["throughput"]
    names = {
        "fingerprint_1_thread": "fingerprint, 1 thread",
        "fingerprint_2_threads": "fingerprint, 2 threads",
        "memcpy_1_thread": "memcpy, 1 thread",
        "memcpy_2_threads": "memcpy, 2 threads",
        "zlib_crc32_1_thread": "zlib.crc32",
        "sha256_1_thread": "sha256",
    }
    rows = []
    for k in [n for n in names if n in t["gb_per_s"]] + [n for n in t["gb_per_s"] if n not in names]:
        v = t["gb_per_s"][k]
        bold = k in ("fingerprint_1_thread", "memcpy_1_thread")
        val = fmt(v["gb_per_s"])
        rows.append(
            [names.get(k, k), f"**{val}**" if bold else val, fmt(v["gb_per_s_min"]), fmt(v["gb_per_s_max"])]
        )
    out += table(["case", "GB/s (median)", "min", "max"], rows) + [""]
    g = next((x for x in d.get("goals", []) if "throughput" in x["goal"]), None)
    if g:
        out += [
            f"**Fingerprint ÷ single-thread memcpy = {fmt(g['value'], '.3g')}** (goal {g['target'].replace('>=', '≥')}: "
            f"{'met' if g['met'] else 'not met'}).",
            "",
        ]
    out += INTEGRITY_A_MEANING.render(d)
    out += ["### (b) What the protections cost", "", INTEGRITY_B]
    out += command_block(d["settings"]["command_baseline"]) + [INTEGRITY_B_AFTER]
    configs = r["protections"]["configs"]

    def cadence(name: str, key: str) -> Any:  # as the run set it
        return configs.get(name, {}).get("sets", {}).get(f"integrity.{key}", "?")

    labels = {
        "baseline": "baseline (all off)",
        "fingerprint_k1": "fingerprints K = 1",
        "fingerprint_default": f"fingerprints K = {cadence('fingerprint_default', 'fingerprint_every')}",
        "audit_default": f"audit M = {cadence('audit_default', 'audit_every')}",
        "snapshots_default": f"fingerprints + snapshots every {cadence('snapshots_default', 'snapshot_every')}",
        "all_defaults": "all defaults (+ start-up check)",
    }
    rows = []
    for name in [n for n in labels if n in configs] + [n for n in configs if n not in labels]:
        c = configs[name]
        st = c["step_time_s"]
        due = c.get("due", {})
        if name == "fingerprint_k1":
            due_text = "every step"
        elif due:
            due_text = ", ".join(
                f"{v['steps']} {k.replace('+', ' + ')} at {fmt(v['median_s'])}" for k, v in due.items()
            )
        else:
            due_text = "–"
        base = name == "baseline"
        rows.append(
            [
                labels.get(name, name),
                fmt(st["median"]),
                fmt(st["p10"]),
                " / ".join(fmt(x["median_step_time_s"]) for x in c["runs"]),
                due_text,
                "–"
                if base or c["overhead_within_run"] is None
                else f"**{pct(c['overhead_within_run'], digits=2)}**",
                "–" if base else pct(c["overhead_median"], digits=1),
                "–" if base else pct(c["overhead_p10"], digits=1),
                "–" if base else " / ".join(pct(x, digits=0) for x in c["overhead_per_round"]),
            ]
        )
    out += table(
        [
            "configuration",
            "median step s",
            "p10 s",
            "run medians s (rounds 1/2/3)",
            "due steps (count, median s)",
            "**within run**",
            "vs baseline: median",
            "p10",
            "per round",
        ],
        rows,
    ) + [""]
    cost = r["protections"]["cost_per_protection"]
    total = next((x for x in d.get("goals", []) if "protections" in x["goal"]), None)
    if total:
        out += [
            f"Per protection at its default (within run): **audit {pct(cost.get('audit'), signed=False, digits=1)}**, "
            f"**snapshots {pct(cost.get('snapshot'), signed=False, digits=1)}** (snapshots_default − "
            f"fingerprint_default), **fingerprints "
            f"{pct(cost.get('fingerprint'), signed=False, digits=2)}**; **all defaults together "
            f"{pct(total['value'], signed=False)} of step time: the ≤ 5% goal is {'met' if total['met'] else 'not met'}.**",
            "",
        ]
    return out + INTEGRITY_B_MEANING.render(d)


# ---------------------------------------------------------------------------------------------
# Figures


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(rep: Report, fig: Any, name: str) -> Path:
    path = rep.bench_dir / name
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    rep.figures.append(path)
    return path


PHASE_COLORS = {"detected": "#d95f02", "restarted": "#7570b3", "first step": "#1b9e77"}


def timeline_figure(
    rep: Report, rows: Sequence[Mapping[str, Any]], labels: Sequence[str], title: str, name: str
) -> Path:
    """One horizontal bar per fault: injected (0) -> detected -> restarted -> first step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.3))
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        edges = [0.0]
        for key, phase in (
            ("detected_s", "detected"),
            ("restarted_s", "restarted"),
            ("first_step_s", "first step"),
        ):
            v = row.get(key)
            if v is None:
                continue
            ax.barh(
                y,
                v - edges[-1],
                left=edges[-1],
                color=PHASE_COLORS[phase],
                height=0.6,
                label=phase if i == 0 or phase not in ax.get_legend_handles_labels()[1] else None,
            )
            edges.append(v)
        if row.get("recovery_s") is not None:
            ax.text(row["recovery_s"], y, f" {row['recovery_s']:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(reversed(labels)), fontsize=8)
    ax.set_xlabel("seconds after the fault was injected")
    ax.set_title(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles, strict=False))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3)
    ax.set_xlim(0, 1.15 * max((r.get("recovery_s") or 0.0 for r in rows), default=1.0) or 1.0)
    ax.grid(axis="x", alpha=0.3)
    return save(rep, fig, name)


def loss_figure(rep: Report, d: Mapping[str, Any], name: str) -> Path | None:
    r = d["results"]
    clean = r["fault_free"].get("series")
    faulted = r["faulted"].get("series")
    if not clean or not faulted:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))

    def steps_of(s: Mapping[str, Any]) -> list[int]:
        return list(range(s["first_step"], s["first_step"] + len(s["loss"])))

    a1.plot(steps_of(clean), clean["loss"], lw=0.8, label="fault-free", color="#1b9e77")
    a1.plot(
        steps_of(faulted),
        faulted["loss"],
        lw=0.8,
        ls="--",
        label="faulted (final trajectory)",
        color="#d95f02",
    )
    kinds = {"crash": "#e7298a", "hang": "#7570b3", "bitflip": "#e6ab02", "slow": "#666666"}
    seen: set[str] = set()
    for f in r["faulted"].get("faults", []):
        step = f.get("injected_step") or f.get("scheduled_step")
        if step is None:
            continue
        a1.axvline(
            step,
            color=kinds.get(f["kind"], "k"),
            lw=0.6,
            alpha=0.7,
            label=None if f["kind"] in seen else f["kind"],
        )
        seen.add(f["kind"])
    a1.set_xlabel("step")
    a1.set_ylabel("training loss (mean over ranks)")
    a1.set_title(
        f"{r['schedule']}: loss by step (final states identical: {fmt(r['final_matches_golden'])})",
        fontsize=9,
    )
    a1.legend(fontsize=7)
    runs = [("fault-free", r["fault_free"], "#1b9e77"), ("faulted", r["faulted"], "#d95f02")]
    if r.get("torchrun"):
        runs.append(("torchrun, crashes only", r["torchrun"], "#7570b3"))
    for label, run, color in runs:
        prog = run.get("progress")
        if prog:
            a2.plot(prog["t_s"], prog["step"], lw=0.9, label=label, color=color)
    a2.set_xlabel("seconds since the start of step 1")
    a2.set_ylabel("step completed (rank 0)")
    a2.set_title("progress by wall time: flat stretches and drops are the faults' cost", fontsize=9)
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    return save(rep, fig, name)


def ettr_figure(rep: Report, runs: Sequence[Mapping[str, Any]], name: str) -> Path | None:
    pts = []
    for d in runs:
        r, s = d["results"], d["settings"]
        pts.append((1000.0 / s["mean_interval_steps"], r))
    if not pts:
        return None
    pts.sort(key=lambda p: p[0])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [p[0] for p in pts]
    for key, label, style in (
        ("ettr", "Stanchion ETTR", "o-"),
        ("ettr_local", "Stanchion ETTR, time-local", "s--"),
        ("ettr_fault_free", "fault-free ceiling (same formula, no faults)", "x:"),
        ("torchrun_ettr", "torchrun ETTR, crashes only", "^-"),
        ("torchrun_ettr_local", "torchrun ETTR, time-local, crashes only", "v--"),
    ):
        ys = [
            p[1].get(key) if key != "torchrun_ettr_local" else (p[1].get("torchrun") or {}).get("ettr_local")
            for p in pts
        ]
        if any(y is not None for y in ys):
            ax.plot(
                [x for x, y in zip(xs, ys, strict=True) if y is not None],
                [y for y in ys if y is not None],
                style,
                label=label,
            )
    for x, r in pts:
        ax.annotate(
            f"{r['schedule']}\n{r['faults_scheduled']} faults",
            (x, r.get("ettr") or 0),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, -22),
        )
    for target, sched in ((0.97, "S1"), (0.80, "S2")):
        x = next((p[0] for p in pts if p[1]["schedule"] == sched), None)
        if x is not None:
            ax.plot([x], [target], "k_", markersize=18)
            ax.annotate(f"goal {target}", (x, target), fontsize=7, textcoords="offset points", xytext=(8, 2))
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the schedules' rates, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("nominal fault rate (faults per 1,000 steps; log scale)")
    ax.set_ylabel("ETTR")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    models = sorted({d["settings"].get("model", "tiny") for d in runs})
    steps_ms = [1000 * d["results"]["median_step_s_fault_free"] for d in runs]
    ax.set_title(
        f"ETTR against fault rate ({', '.join(models)} model, "
        f"{min(steps_ms):.0f}–{max(steps_ms):.0f} ms median steps)",
        fontsize=10,
    )
    return save(rep, fig, name)


# ---------------------------------------------------------------------------------------------
# Recovery, coordinator, bisection, goodput


# What each benchmark model (diagnostics/bench/recovery.py MODELS) is, in words: text/model_NAME.md.
MODEL_TEXT = {name: prose(f"model_{name}").rstrip("\n") for name in ("tiny", "small", "medium")}


def model_text(settings: Mapping[str, Any]) -> str:
    name = settings.get("model", "tiny")
    return f"`{name}`: {MODEL_TEXT.get(name, 'see the JSON settings')}"


RECOVERY_MEANING = Commentary.load("recovery_meaning")
GOODPUT_MEANING = Commentary.load("goodput_meaning")


def recovery_section(rep: Report) -> list[str]:
    d = rep.load("recovery.json")
    out = ["## Recovery: one rank killed, beside torchrun and torchft", ""]
    if d is None:
        return out + [NOT_MEASURED, ""]
    r, s = d["results"], d["settings"]
    out += command_block(d["command"]) + [RECOVERY_WHAT_RUNS]
    out += [
        f"Model: {model_text(s)} on `{s['data']}`; {s['steps']} steps per job, checkpoint every {s['checkpoint_every']} "
        f"steps on both sides, kill after step {s['kill_step']}, {s['trials']} trials per system. torchrun: "
        f"`{s['torchrun']['command']}`."
        + (
            f" torchft: replica 0 `{s['torchft']['worker']}`, lighthouse `{s['torchft']['lighthouse']}`."
            if s.get("torchft")
            else ""
        ),
        "",
        finished_line(d),
        "",
    ]
    rows = []
    for key, name in (("stanchion", "Stanchion"), ("torchrun", "torchrun"), ("torchft", "torchft")):
        x = r.get(key)
        if not x:
            continue
        ph = x.get("first_step_s_phases", {})
        rows.append(
            [
                name,
                f"**{fmt(x['recovery_s'], '.3f')}**",
                f"{fmt(x['recovery_s_min'], '.3f')} – {fmt(x['recovery_s_max'], '.3f')}",
                fmt(ph.get("detected_s"), ".3f"),
                fmt(ph.get("restarted_s"), ".3f"),
                f"**{fmt(x['lost_steps'], 'g')}**",
                fmt(x["lost_steps_max"], "g"),
                f"{x['measured']}/{x['trials']}",
            ]
        )
    out += table(
        [
            "system",
            "recovery s (median)",
            "min – max",
            "detected s (median)",
            "restarted s (median)",
            "lost steps (median)",
            "max",
            "trials",
        ],
        rows,
    ) + [""]
    per_round = " / ".join(fmt(x, ".3f") for x in r.get("ratio_per_round", []))
    out += [
        f"**Stanchion ÷ torchrun recovery time = {fmt(r['ratio'], '.3f')}** (medians; per round {per_round}). "
        f"Final state of every trial, Stanchion and torchrun: {'one and the same fingerprint' if r.get('final_fingerprints_equal') else 'NOT all equal'} "
        f"(`{', '.join(r.get('final_fingerprints', []))}`).",
        "",
    ]
    if r.get("torchft"):
        ft_round = " / ".join(fmt(x, ".3f") for x in r.get("ratio_vs_torchft_per_round", []))
        out += [
            f"**Stanchion ÷ torchft recovery time = {fmt(r['ratio_vs_torchft'], '.3f')}** (medians; per round "
            f"{ft_round}). torchft's recovery is its survivor's next committed step begun after the kill; both "
            f"replicas committed together again {fmt(r['torchft'].get('full_world_s'), '.3f')} s after the kill "
            "(median): the restarted process's start-up, then a heal from the survivor over HTTP. Its final "
            "state is another one (the survivor alone averaged only its own gradients).",
            "",
        ]
    trows = []
    for t in sorted(r["trials"], key=lambda t: (t["round"], t["system"])):
        trows.append(
            [
                t["round"] + 1,
                t["system"],
                t["steps_before"],
                f"{t['resume_step']} ({t['resume_source']})",
                t["lost_steps"],
                fmt(t.get("detected_s"), ".3f"),
                fmt(t.get("restarted_s"), ".3f"),
                fmt(t.get("recovery_s"), ".3f"),
                fmt(t.get("standby_wait_s"), ".1f") if t["system"] == "stanchion" else "–",
                fmt(t.get("load_1min"), ".2g"),
            ]
        )
    out += (
        ["Every trial:", ""]
        + table(
            [
                "round",
                "system",
                "steps before the kill",
                "resumed from",
                "lost",
                "detected s",
                "restarted s",
                "recovery s",
                "standby wait s",
                "load (1 min)",
            ],
            trows,
        )
        + [""]
    )
    trials = sorted(r["trials"], key=lambda t: (t["system"] != "stanchion", t["round"]))
    png = timeline_figure(
        rep,
        trials,
        [f"{t['system']} r{t['round'] + 1}" for t in trials],
        "Recovery after SIGKILL of rank 1: phases per trial",
        "recovery-timeline.png",
    )
    out += [f"![Recovery phases per trial]({rep.link(png)})", ""]
    out += goals_lines(d)
    return out + RECOVERY_MEANING.render(d)


def goals_lines(d: Mapping[str, Any]) -> list[str]:
    gs = d.get("goals", [])
    if not gs:
        return []
    return [
        "Goals:",
        "",
        *(
            f"- {g['goal']}: {fmt(g.get('value'), '.4g')} (target {g['target']}): "
            f"**{ {True: 'met', False: 'not met', None: 'not judged'}[g.get('met')] }**"
            for g in gs
        ),
        "",
    ]


def agent_restart_section(rep: Report) -> list[str]:
    out = ["## An agent restart: ranks adopted beside ranks that die with their agent", ""]
    d = rep.load("agent-restart.json")
    if d is None:
        return out + [NOT_MEASURED, ""]
    out += [AGENT_RESTART_WHAT_RUNS.strip(), ""]
    out += command_block(d["command"])
    r = d["results"]
    out += [finished_line(d), ""]
    rows = [
        [
            label,
            f"**{fmt(r[key]['time_lost_s'], '.3f')}**",
            fmt(r[key]["time_lost_s_max"], ".3f"),
            natural(r[key]["lost_steps_max"]),
            natural(r[key]["new_generations"]),
            fmt(r[key]["agent_served_s"], ".3g"),
            fmt(r[key]["adopted_s"], ".3g"),
            natural(r[key]["trials"]),
        ]
        for label, key in (("adopted (default)", "adopted"), ("die with the agent", "ranks_die"))
    ]
    out += table(
        [
            "ranks",
            "training time lost s (median)",
            "max",
            "lost steps (max)",
            "new generations",
            "kill to new agent serving s",
            "kill to adoption s",
            "trials",
        ],
        rows,
    )
    out += ["", f"Adopted / die with the agent: **{fmt(r['ratio'], '.3g')}** (medians).", ""]
    out += goals_lines(d)
    return out + [""] + AGENT_RESTART_MEANING.render(d)


def standby_section(rep: Report) -> list[str]:
    out = ["## Warm standbys at real sizes: assignment to first step", ""]
    d = rep.load("standby.json")
    if d is None:
        return out + [NOT_MEASURED, ""]
    out += [STANDBY_WHAT_RUNS.strip(), ""]
    out += command_block(d["command"])
    r = d["results"]
    out += [finished_line(d) + f" One micro-batch of {r['seq_len']} tokens per step.", ""]
    rows = []
    for preset, p in r["presets"].items():
        for mode in ("cold", "warm"):
            m = p[mode]
            rows.append(
                [
                    f"{preset} ({params_text(p['params'])})",
                    mode,
                    fmt(m["ready_s"], ".3g"),
                    fmt(m["assignment_to_started_s"], ".3g"),
                    f"**{fmt(m['assignment_to_first_step_s'], '.3g')}**",
                    fmt(m["second_step_s"], ".3g"),
                ]
            )
    out += table(
        [
            "preset",
            "standby",
            "launch to ready s",
            "assignment to started s",
            "assignment to first step s",
            "one step s",
        ],
        rows,
    )
    return out + [""] + STANDBY_MEANING.render(d)


def checkpoint_section(rep: Report) -> list[str]:
    out = ["## Checkpoint stall: Stanchion beside plain dcp.async_save", ""]
    d = rep.load("checkpoint.json")
    if d is None:
        return out + [NOT_MEASURED, ""]
    out += [CHECKPOINT_WHAT_RUNS.strip(), ""]
    out += command_block(d["command"])
    s = d["settings"]
    out += [
        finished_line(d) + f" {s['nproc']} ranks, {s['rounds']} rounds; {s['gap']} ordinary steps before "
        f"each checkpoint, {s['window']} after it counted in its excess.",
        "",
    ]
    rows = []
    for preset, r in d["results"]["presets"].items():
        for kind, label in (("plain", "dcp.async_save"), ("stanchion", "Stanchion")):
            k = r[kind]
            rows.append(
                [
                    preset,
                    label,
                    f"**{fmt(k['blocked_s'], '.3g')}**",
                    ", ".join(fmt(x, ".3g") for x in k["blocked_s_each"]),
                    fmt(k["window_excess_s"], ".3g"),
                    fmt(k["ordinary_step_s"], ".3g"),
                ]
            )
        rows.append([preset, "Stanchion ÷ plain", f"**{fmt(r['blocked_ratio'], '.3g')}**", "", "", ""])
    out += table(
        ["preset", "checkpoint", "blocked s (median)", "each round", "window excess s", "a step s"], rows
    )
    notes = sorted(
        {n for r in d["results"]["presets"].values() for n in r.get("notes", []) if "reduced" in n}
    )
    if notes:
        out += ["", "Batch as in `bench trainer`: " + "; ".join(notes) + "."]
    return out + [""] + CHECKPOINT_MEANING.render(d)


def coordinator_section(rep: Report) -> list[str]:
    d = rep.load("coordinator.json")
    out = ["## Coordinator", ""]
    if d is None:
        return out + [NOT_MEASURED, ""]
    if d.get("command"):
        out += command_block(d["command"])
    if d.get("finished_at"):
        out += [finished_line(d), ""]
    res = d.get("results", d)
    rows_src: list[Mapping[str, Any]] = []
    for key in ("rows", "runs", "levels", "scales"):
        if isinstance(res.get(key), list) and all(isinstance(x, Mapping) for x in res[key]):
            rows_src = res[key]
            break
    cols = ("agents", "p50_ms", "p99_ms", "failures")
    if not rows_src:
        if isinstance(res.get("agents"), list):
            n = len(res["agents"])
            rows_src = [
                {
                    c: (res[c][i] if isinstance(res.get(c), list) and i < len(res[c]) else res.get(c))
                    for c in cols
                }
                for i in range(n)
            ]
        else:
            rows_src = [res]
    extra = [k for k in ("heartbeats_per_s", "rpc", "duration_s") if any(k in x for x in rows_src)]
    out += table(
        ["agents", "p50 ms", "p99 ms", "failures", *extra],
        [[natural(x.get(c)) for c in (*cols, *extra)] for x in rows_src],
    ) + [""]
    out += goals_lines(d)
    return out


def bisection_section(rep: Report) -> list[str]:
    d = rep.load("bisect.json")
    out = ["## Bisection", ""]
    if d is None:
        return out + [NOT_MEASURED, ""]
    out += command_block(d.get("command", BISECT_COMMAND))
    out += [finished_line(d) if d.get("finished_at") else stale_text(d).strip(), ""]
    n = len(d.get("suspects", []))
    bound = math.ceil(math.log2(n)) if n > 1 else 0
    defective = ", ".join(d.get("defective", [])) or "none"
    out += [prose("bisection_what_runs").format(n=n, defective=defective), ""]
    out += table(
        [
            "state",
            "named faulty",
            "truly defective",
            "cordoned",
            "rounds",
            "bound ⌈log₂ N⌉",
            "reference",
            "confidence",
            "wall s",
        ],
        [
            [
                d.get("state"),
                ", ".join(d.get("faulty", [])) or "none",
                ", ".join(d.get("defective", [])) or "none",
                ", ".join(d.get("cordoned", [])) or "none",
                f"**{d.get('rounds')}**",
                bound,
                d.get("reference"),
                fmt(d.get("confidence"), ".6g"),
                f"**{fmt(d.get('wall_s'), '.3g')}**",
            ]
        ],
    ) + [""]
    rows = []
    for h in d.get("history", []):
        groups = h.get("groups", [])
        rows.append(
            [
                h.get("round"),
                f"{len(groups)} group(s) of {max((len(g) for g in groups), default=0)}",
                h.get("summary", "")[:400],
            ]
        )
    if rows:
        out += ["Rounds:", ""] + table(["round", "groups", "traces"], rows) + [""]
    out += [f"Verdict: {d.get('reason', '')}", "", prose("bisection_group_size").format(n=n, bound=bound), ""]
    return out


def goodput_docs(rep: Report) -> list[dict[str, Any]]:
    docs = []
    for p in sorted(rep.bench_dir.glob("goodput*.json")):
        d = rep.load(p.name)
        assert d is not None
        d["_file"] = p.name
        docs.append(d)
    order = {"S1": 0, "S2": 1}
    return sorted(
        docs, key=lambda d: (order.get(d["results"]["schedule"], 2), d["settings"]["mean_interval_steps"])
    )


def goodput_section(rep: Report) -> list[str]:
    docs = goodput_docs(rep)
    out = ["## Goodput: ETTR through seeded fault schedules", ""]
    if not docs:
        return out + [NOT_MEASURED, ""]
    out += [GOODPUT_WHAT_RUNS]
    for d in docs:
        out += command_block(d["command"])
    out += [f"Model: {'; '.join(sorted({model_text(d['settings']) for d in docs}))}.", ""]
    rows = []
    for d in docs:
        r, s = d["results"], d["settings"]
        kinds = ", ".join(f"{v} {k}" for k, v in r["faults_by_kind"].items() if v)
        label = f"{r['schedule']} (1 per {s['mean_interval_steps']:g}), {r['steps']:,} steps"
        runs: list[tuple[str, Mapping[str, Any], str, str]] = [
            ("fault-free (Stanchion)", r["fault_free"], "0", "golden"),
            (
                "faulted (Stanchion)",
                r["faulted"],
                f"{r['faults_scheduled']}: {kinds}",
                fmt(r["final_matches_golden"]),
            ),
        ]
        for peer in ("torchrun", "torchft"):
            tr = r.get(peer)
            if tr:
                crashes = r["faults_by_kind"].get("crash", 0)
                runs.append(
                    (f"{peer}, crashes only", tr, f"{crashes} crash", fmt(tr.get("final_matches_golden")))
                )
        for i, (name, run, faults, final) in enumerate(runs):
            rec = [
                x["recovery_s"]
                for x in run.get("faults", [])
                if x.get("kind") == "crash" and x.get("recovery_s") is not None
            ]
            rows.append(
                [
                    label if i == 0 else "",
                    name,
                    faults,
                    fmt(run.get("median_step_s", 0) * 1000, ".3g"),
                    fmt(run.get("wall_s"), ".3g"),
                    (
                        f"{fmt(run.get('ettr'), '.3f')} (ceiling)"
                        if i == 0
                        else f"**{fmt(run.get('ettr'), '.3f')}**"
                    ),
                    fmt(run.get("ettr_local"), ".3f")
                    if i == 0
                    else f"**{fmt(run.get('ettr_local'), '.3f')}**",
                    fmt(run.get("lost_steps")),
                    fmt(sorted(rec)[len(rec) // 2] if rec else None, ".3g"),
                    final,
                ]
            )
    out += table(
        [
            "schedule",
            "run",
            "faults",
            "median step ms",
            "wall s",
            "ETTR",
            "ETTR (local)",
            "lost steps",
            "crash recovery s (median)",
            "final == golden",
        ],
        rows,
    ) + [""]
    norm = [
        f"{d['results']['schedule']}: normalized ETTR (fault-free wall / faulted wall) "
        f"{fmt(d['results'].get('ettr_normalized'), '.3f')}, faulted median step / fault-free median step "
        f"{fmt(d['results'].get('median_step_drift'), '.3f')}"
        for d in docs
    ]
    out += ["Load drift between the runs of one invocation: " + "; ".join(norm) + ".", ""]
    for d in docs:
        out += [f"- {d['results']['confidence']}; {finished_line(d)} `{d['_file']}`."]
    out += [""]
    png = ettr_figure(rep, docs, "goodput-ettr.png")
    if png:
        out += [f"![ETTR against fault rate]({rep.link(png)})", ""]
    for d in docs:
        r = d["results"]
        sched = r["schedule"]
        out += [f"### {sched}: every fault", ""]
        frows = []
        for f in sorted(r["faulted"].get("faults", []), key=lambda f: f.get("scheduled_step", 0)):
            frows.append(
                [
                    f["kind"],
                    f.get("rank"),
                    f.get("scheduled_step"),
                    f.get("injected_step", "–"),
                    fmt(f.get("at_s"), ".1f"),
                    fmt(f.get("detected_s"), ".3f"),
                    fmt(f.get("restarted_s"), ".3f"),
                    fmt(f.get("recovery_s"), ".3f"),
                    fmt(f.get("lost_steps")),
                    f.get("resume_source")
                    or (
                        f"+{fmt(f.get('extra_s'), '.2f')} s over {f.get('steps')} steps"
                        if f["kind"] == "slow"
                        else "–"
                    ),
                ]
            )
        out += table(
            [
                "fault",
                "rank",
                "scheduled step",
                "injected after step",
                "at s",
                "detected s",
                "restarted s",
                "recovery s",
                "lost steps",
                "resumed from / cost",
            ],
            frows,
        ) + [""]
        ft = r.get("torchft")
        if ft and ft.get("faults"):
            out += [f"torchft, the same crashes (replica 0: `{ft['command']}`):", ""]
            out += table(
                [
                    "rank",
                    "scheduled step",
                    "injected after step",
                    "recovery s",
                    "both replicas again s",
                    "lost steps",
                ],
                [
                    [
                        f.get("rank"),
                        f.get("scheduled_step"),
                        f.get("injected_step"),
                        fmt(f.get("recovery_s"), ".3f"),
                        fmt(f.get("full_world_s"), ".3f"),
                        fmt(f.get("lost_steps")),
                    ]
                    for f in ft["faults"]
                ],
            ) + [""]
        tr = r.get("torchrun")
        if tr and tr.get("faults"):
            out += [f"torchrun, the same crashes (`{tr['command']}`):", ""]
            out += table(
                [
                    "fault",
                    "rank",
                    "scheduled step",
                    "injected after step",
                    "restarted s",
                    "recovery s",
                    "lost steps",
                    "resumed from",
                ],
                [
                    [
                        f["kind"],
                        f.get("rank"),
                        f.get("scheduled_step"),
                        f.get("injected_step"),
                        fmt(f.get("restarted_s"), ".3f"),
                        fmt(f.get("recovery_s"), ".3f"),
                        fmt(f.get("lost_steps")),
                        f"{f.get('resume_step')} ({f.get('resume_source')})",
                    ]
                    for f in tr["faults"]
                ],
            ) + [""]
        rows_t = [f for f in r["faulted"].get("faults", []) if f.get("recovery_s") is not None]
        if rows_t:
            png = timeline_figure(
                rep,
                rows_t,
                [
                    f"{f['kind']} @{f.get('injected_step', f.get('scheduled_step'))} r{f.get('rank')}"
                    for f in rows_t
                ],
                f"{sched}: recovery of every crash, hang and bit flip (Stanchion)",
                f"goodput-timeline-{sched}.png",
            )
            out += [f"![{sched} recovery timelines]({rep.link(png)})", ""]
        png = loss_figure(rep, d, f"goodput-loss-{sched}.png")
        if png:
            out += [f"![{sched} loss curves]({rep.link(png)})", ""]
        out += goals_lines(d)
    return out + GOODPUT_MEANING.render(docs[-1])


# ---------------------------------------------------------------------------------------------
# The document


DRILL_TEXT = prose("drill_text")
DRILL_MEANING = Commentary.load("drill_meaning")


def drill_section(rep: Report) -> list[str]:
    d = rep.load("chaos-drill.json")
    out = ["## A long chaos drill (`stanchion up`)", ""]
    if d is None:
        return out + [NOT_MEASURED, ""]
    if d.get("command"):
        out += command_block(d["command"])
    if d.get("finished_at"):
        out += [finished_line(d), ""]
    out += [DRILL_TEXT, ""]
    kinds = d.get("faults_by_kind", {})
    detected = d.get("faults_detected", [])
    rows = []
    for k, v in kinds.items():
        seen = [x for x in detected if x.get("kind") == k]
        rows.append(
            [k, v.get("scheduled"), v.get("fired"), f"{sum(x['detected'] for x in seen)}/{len(seen)}"]
        )
    out += table(["kind", "scheduled", "fired", "answered by a decision"], rows) + [""]
    second = d.get("second_faults", {})
    rec = sorted(x for x in d.get("recovery_seconds", []) if x is not None)
    inv = d.get("invariants", {})
    facts = [
        ["faults fired", f"{d.get('faults_fired')} of {d.get('faults_scheduled')} scheduled"],
        [
            "second faults",
            f"{second.get('scheduled')} scheduled, {second.get('landed_in_recovery')} landed in a recovery, "
            f"{second.get('landed_after_recovery')} after it",
        ],
        [
            "steps",
            f"{d.get('steps_completed')} completed, {d.get('steps_computed')} computed ({d.get('lost_steps')} redone)",
        ],
        ["generations", natural(d.get("generations"))],
        [
            "recovery (s)",
            f"median {fmt(statistics.median(rec))}, p90 {fmt(rec[int(0.9 * (len(rec) - 1))])}, max {fmt(rec[-1])} "
            f"over {len(rec)}"
            if rec
            else "none measured",
        ],
        ["wall (s)", fmt(d.get("wall_seconds"))],
        ["ETTR", fmt(d.get("ettr"))],
    ]
    for name, v in inv.items():
        verdict = {True: "**held**", False: "**broken**", None: "not checked"}[v.get("ok")]
        detail = v.get("detail") or ""
        if not detail and "worst_s" in v:  # the recovery bound: the worst, and the ones over it
            over = ", ".join(
                f"{o['kind']} at step {o['step']}: {fmt(o['recovery_s'])} s" for o in v.get("over", [])
            )
            detail = (
                f"worst {fmt(v['worst_s'])} s of {v.get('measured')} against {fmt(v.get('bound_s'))} s"
                + (f" (over: {over})" if over else "")
            )
        facts.append([name.replace("_", " "), f"{verdict}: {detail}"])
    out += table(["", "value"], facts) + [""]
    return out + DRILL_MEANING.render(d)


def render(bench_dir: Path, out: Path) -> tuple[str, list[Path]]:
    """The markdown of docs/benchmarks.md and the figures written for it."""
    rep = Report(bench_dir, out)
    docs: dict[str, dict[str, Any]] = {}
    for name, base, _ in TRAINER_RUNS:
        d = rep.load(name)
        if d is not None:
            docs["trainer" if base == "ddp" else f"trainer, {base}"] = d
    for name in ("integrity", "recovery", "agent-restart", "checkpoint", "coordinator"):
        d = rep.load(f"{name}.json")
        if d is not None:
            docs[name] = d
    for label, name in (("sdk", "sdk.json"), ("sdk, 4x batch", "sdk-large.json")):
        d = rep.load(name)
        if d is not None:
            docs[label] = d
    for d in goodput_docs(rep):
        docs[f"goodput {d['results']['schedule']}"] = d
    parts: list[str] = [INTRO]
    parts += goals_section(rep, docs)
    parts += [HOW_TO_READ]
    parts += machine_section(docs)
    sections: list[Callable[[Report], list[str]]] = [
        trainer_section,
        sdk_section,
        integrity_section,
        recovery_section,
        agent_restart_section,
        standby_section,
        checkpoint_section,
        goodput_section,
        drill_section,
        coordinator_section,
        bisection_section,
    ]
    for section in sections:
        parts += section(rep)
    parts += ["## GPU", "", GPU_TEXT, ""]
    text = "\n".join(parts)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n", rep.figures
