#!/usr/bin/env bash
# The whole workflow on a CUDA machine: every strategy, predict/evaluate/calibrate/report,
# ONNX export and predict through it, serve, then the fast test suite with the GPU visible.
# Usage: scripts/gpu_check.sh DATA OUTDIR   (DATA: an image folder with train/ and val/)
# Each step prints its exit code and wall time; the script goes on after a failure and ends
# with a table, so one run on a lent machine shows everything that breaks. Install what the machine
# lacks first (embedded weights, torchinfo, fastapi and its dependencies, opentelemetry among them).
set -u
DATA=${1:?usage: gpu_check.sh DATA OUTDIR}
OUT_DIR=${2:?usage: gpu_check.sh DATA OUTDIR}
RUNS=$(mktemp -d)
mkdir -p "$OUT_DIR"
HS="python3 -m headstart"
declare -a SUMMARY=()

step() {  # step NAME CMD...: run, time, remember the exit code
  local name=$1; shift
  echo "=== $name: $*"
  local t0; t0=$(date +%s%N)
  "$@"
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  SUMMARY+=("$(printf '%-28s rc=%-3s %6d ms' "$name" "$rc" "$ms")")
}

acc() {  # what a run recorded: device, strategy, val accuracy, seconds
  python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))
print(sys.argv[1].rsplit("/", 1)[-1], r["device"], r["strategy"], "val", r["val_accuracy"], "train_s", r["train_seconds"])
PY
}

python3 - <<'EOF'
import torch
from headstart.core.device import pick_device, autocast_for
d = pick_device()
print("picked", d, torch.__version__, torch.cuda.get_device_name(0) if d.type == "cuda" else "")
print("autocast", autocast_for(d))
EOF

step extract $HS train "$DATA" --strategy extract -o "$RUNS/extract"
step extract-again $HS train "$DATA" --strategy extract -o "$RUNS/extract2"  # warm cache
step finetune $HS train "$DATA" --strategy finetune --unfreeze 2 --epochs 3 -o "$RUNS/finetune"
step finetune-prefix $HS train "$DATA" --strategy finetune --cache-prefix --unfreeze 2 --epochs 3 \
  -o "$RUNS/prefix"
step full $HS train "$DATA" --strategy full --epochs 2 -o "$RUNS/full"
step auto $HS train "$DATA" --budget 2m -o "$RUNS/auto"
# killed after 25 s, then resumed from its checkpoint
step killed timeout -s KILL 25 $HS train "$DATA" --strategy finetune --unfreeze 1 --epochs 15 -o "$RUNS/killed"
step resume $HS train --resume "$RUNS/killed"
step evaluate $HS evaluate "$RUNS/finetune"
step predict $HS predict "$RUNS/finetune" "$DATA/val" --csv "$RUNS/pred.csv"
step calibrate $HS calibrate "$RUNS/extract"
step predict-sets $HS predict "$RUNS/extract" "$DATA/val" --sets --reject --csv "$RUNS/sets.csv"
step report $HS report "$RUNS/finetune"
step export-onnx $HS export "$RUNS/extract" --format onnx
step predict-onnx $HS predict "$RUNS/extract" "$DATA/val" --engine onnx --sets --reject --csv "$RUNS/onnx.csv"
step bench $HS bench --device cuda --seconds 5
step serve python3 - "$RUNS/extract" "$DATA/val" <<'EOF'
import sys, pathlib
from fastapi.testclient import TestClient
from headstart.deploy.serve import create_app
app = create_app(sys.argv[1])
img = next(p for p in pathlib.Path(sys.argv[2]).rglob("*.jpg"))
with TestClient(app) as client:
    r = client.post("/v1/predict", files={"file": (img.name, img.read_bytes(), "image/jpeg")})
    print(r.status_code, r.json())
    assert r.status_code == 200, r.text
EOF
python3 - "$RUNS/sets.csv" "$RUNS/onnx.csv" <<'EOF'
import csv, sys
a, b = ([r for r in csv.DictReader(open(p))] for p in sys.argv[1:])
same = sum(x["label"] == y["label"] for x, y in zip(a, b))
print(f"torch(cuda) vs onnx(cpu) labels agree on {same}/{len(a)}")
EOF

for r in extract extract2 finetune prefix full auto killed; do acc "$RUNS/$r"; done 2>&1
cp "$RUNS/finetune/results.json" "$OUT_DIR/finetune_results.json" 2>/dev/null
cp "$RUNS/auto/results.json" "$OUT_DIR/auto_results.json" 2>/dev/null
[ "${SKIP_TESTS:-0}" = 1 ] || step tests timeout 330 python3 -m pytest -q -m "not slow" -p no:cacheprovider -n 6 --timeout 150
printf '%s\n' "${SUMMARY[@]}"
