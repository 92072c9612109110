#!/usr/bin/env bash
# The GPU check: one short run of every GPU path, on a machine with one NVIDIA GPU, in under
# 8 minutes. It runs the `gpu`-marked tests (NCCL failure handling on one rank, real NVML
# readings), `stanchion diag gpu` on the real device, `stanchion bench device` (fingerprint
# throughput beside a device memcpy, a snapshot's copy to host memory) and gpt2-124m in bf16
# for 200 steps beside plain DDP (`stanchion bench trainer`: tokens/s and model FLOP/s against a
# matmul peak measured in the same run). summary.json adds MFU against the datasheet's dense
# bf16 peak. docs/benchmarks.md ("On a GPU") says how its figures are recorded.
#
#   scripts/gpu-check.sh                  # python3 with a CUDA build of torch; figures in build/gpu-check
#   PYTHON=.venv/bin/python OUT=/tmp/gc scripts/gpu-check.sh
#
# Each part runs even when one before it failed, under its own time limit. Exit status: the
# number of parts that failed (0: all passed).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

part() { # NAME LIMIT_S COMMAND...: run COMMAND, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    local t0=$SECONDS
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - t0))s"
    else
        echo "   FAILED (exit $?) after $((SECONDS - t0))s; the end of $OUT/$name.log:"
        tail -25 "$OUT/$name.log" | sed 's/^/   | /'
        failed=$((failed + 1))
    fi
}

"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))' || exit 99

part gpu-tests 150 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs \
    tests/integration/test_nccl.py tests/unit/test_health.py tests/unit/test_diag_cli.py
part diag-gpu 90 "$PY" -m diagnostics.cli diag gpu --json
part device 90 "$PY" -m diagnostics.cli bench device --json --out "$OUT/device.json"
part trainer 330 "$PY" -m diagnostics.cli bench trainer --preset gpt2-124m --nproc 1 --steps 200 \
    --rounds 1 --json --out "$OUT/trainer.json"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import torch

from stanchion.sdk.devices import bf16_dense_peak

out = Path(sys.argv[1])
name = torch.cuda.get_device_name(0)
summary = {"device_name": name, "torch": torch.__version__, "bf16_dense_peak_flops_per_s": bf16_dense_peak(name)}
if (out / "device.json").exists():
    d = json.loads((out / "device.json").read_text())["results"]
    summary["device"] = {k: d[k] for k in ("gb_per_s", "seconds", "fingerprint_vs_memcpy")}
if (out / "trainer.json").exists():
    t = json.loads((out / "trainer.json").read_text())
    summary["trainer"] = {"command": t["command"], "results": t["results"]}
    peak = summary["bf16_dense_peak_flops_per_s"]
    for r in t["results"].get("presets", {}).values():
        for system in ("stanchion", "ddp"):
            m = r.get(system) or {}
            if m.get("model_flops_per_s") and peak:
                m["mfu_vs_datasheet_bf16"] = m["model_flops_per_s"] / peak
(out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
print(json.dumps(summary, indent=2, sort_keys=True, default=str)[:6000])
EOF
echo "gpu-check: $failed part(s) failed; figures in $OUT"
exit "$failed"
