#!/usr/bin/env bash
# GPU check, prepared for a GPU session (H100/H200, torch CUDA, lightning, accelerate, pytest; no web stack).
#
#   1. the probe-engine tests that need no web stack: tests/probing and tests/models (--noconftest:
#      tests/conftest.py imports fastapi for the API fixtures, which these tests do not use)
#   2. bench/max_batch.py --device cuda: ResNet-50 (224 px) and a GPT-2-small-sized model, fp32 and bf16,
#      each against Lightning's Tuner (power, binsearch), Accelerate and the exact maximum, under a CUDA
#      budget set with torch.cuda.set_per_process_memory_fraction
#   3. one full `run_probe` in-process (the engine alone, no web stack): ResNet-50 (ImageNet stem, 224 px,
#      1000 classes), SGD, bf16, time_to_target with a 120 s budget, timed end to end with its phases
#
# Everything lands in $OUT (default ./gpu_check_out): env.txt, tests.txt, tests.xml, max_batch.md/.json,
# max_batch.log, run_probe.json. Bounded to about 10 minutes: tests 150 s, the bench 330 s (it starts no
# new case after 220 s and writes its results after every case, so a cut-short run still leaves the
# finished cases), run_probe 150 s.
#
#   bash bench/gpu_check.sh                  # PYTHON=python3.11 bash bench/gpu_check.sh to pick one
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
status=0

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(hostname)  cpus: $(nproc)"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
    "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
for name in ("pytorch_lightning", "lightning", "accelerate", "pytest", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== tests/probing tests/models"
timeout -k 10 150 "$PY" -m pytest --noconftest -q -p no:cacheprovider --durations=10 \
    --junitxml="$OUT/tests.xml" tests/probing tests/models > "$OUT/tests.txt" 2>&1
rc=$?
tail -n 25 "$OUT/tests.txt"
echo "tests exit code: $rc (124 = timed out)"
[ "$rc" -eq 0 ] || status=1

echo "== bench/max_batch.py --device cuda"
timeout -k 10 330 "$PY" bench/max_batch.py --device cuda --max-seconds 220 --out "$OUT/max_batch.md" \
    > "$OUT/max_batch.stdout" 2> "$OUT/max_batch.log"
rc=$?
tail -n 40 "$OUT/max_batch.log"
echo "bench exit code: $rc (124 = timed out; finished cases are in $OUT/max_batch.md)"
[ "$rc" -eq 0 ] || status=1
[ -f "$OUT/max_batch.md" ] && sed -n '/^## Results/,/^## Lightning/p' "$OUT/max_batch.md"

echo "== run_probe: ResNet-50 bf16, time_to_target, 120 s budget"
OUT="$OUT" timeout -k 10 150 "$PY" - <<'EOF'
import json
import os
import time

import torch

from service.probing.engine import run_probe
from service.probing.spec import ProbeSpec

spec = ProbeSpec(
    model_name="resnet",
    model_config={"depth": 50, "stem": "imagenet", "image_size": 224, "num_classes": 1000},
    optimizer="sgd", learning_rate=0.1, reference_batch_size=256, precision="bf16",
    device="cuda" if torch.cuda.is_available() else "cpu", time_budget_s=120.0, dataset_size=1_281_167,
)
started = time.monotonic()
result = run_probe(spec, lambda event: None)
seconds = time.monotonic() - started
keys = ("max_feasible_batch_size", "recommended_batch_size", "micro_batch_size", "learning_rate",
        "objective_used", "confidence", "phases", "throughput", "partial")
summary = {"wall_s": round(seconds, 2), **{k: result.get(k) for k in keys}}
print(json.dumps(summary, indent=1, default=str))
with open(os.path.join(os.environ["OUT"], "run_probe.json"), "w") as f:
    json.dump({"summary": summary, "result": result}, f, indent=1, default=str)
EOF
rc=$?
echo "run_probe exit code: $rc (124 = timed out)"
[ "$rc" -eq 0 ] || status=1
exit "$status"
