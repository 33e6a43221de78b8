#!/usr/bin/env bash
# Every GPU check of issues 4 and 5 in one command, for a borrowed GPU machine that has torch but
# no network. Installs nothing from a network; results go to $OUT (default ./gpu-checks-out):
# log.txt, summary.txt, loader_throughput.json, epoch_throughput.json, seed_epochs.jsonl.
#
# Prepare here, once (albumentations and its pure-Python/small needs travel as wheels, <64 MiB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 simsimd==6.5.16 stringzilla==5.3.2
# Run there:   bash benchmarks/gpu_checks.sh        (the device tool: carry [".whl"])
# Try here:    GPU_CHECKS_DEVICE=cpu GPU_CHECKS_QUICK=1 bash benchmarks/gpu_checks.sh
#
# What it measures (each step goes on when one fails; its log says why):
#   1. the GPU tests of the suite (tensor loader on CUDA; DALI GPU when DALI is importable);
#   2. loader_throughput.py on the device (every loader available there);
#   3. epoch_throughput.py: microtrain against a bare loop, per loader, fp32 / bf16 / compile;
#   4. the seed recipe's epoch time with each loader x {fp32, bf16} x {eager, compile}, on data of
#      CIFAR-10's size (synthetic: the full copy is too large to carry), epoch 2 timed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu-checks-out}"
DEVICE="${GPU_CHECKS_DEVICE:-cuda}"
mkdir -p "$OUT"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if [ "${GPU_CHECKS_QUICK:-0}" = 1 ]; then
    TRAIN=512; TEST=256; STEPS=5; WARMUP=2; LOADER_EPOCHS=1; LOADER_LIMIT=(--limit 2000)
    VARIANTS=("precision=fp32")   # CPU bf16 autocast runs this model at ~30 img/s: too slow for a try-out
else
    TRAIN=50000; TEST=10000; STEPS=300; WARMUP=30; LOADER_EPOCHS=3; LOADER_LIMIT=()
    VARIANTS=("precision=fp32" "precision=bf16" "precision=fp32 compile=true" "precision=bf16 compile=true")
fi

if [ -d .whl ] && ! "$PY" -c "import microtrain" 2>/dev/null; then
    # Non-editable install into a scratch folder: registers the built-in plugins' entry points.
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/*.whl . \
        || { echo "gpu_checks: installing the carried wheels failed" | tee "$OUT/summary.txt"; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    export PATH="/tmp/site/bin:$PATH"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    "$PY" -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The device tool brings back at most 8 files: every log goes to log.txt, every result to a few JSON files.
LOG="$OUT/log.txt"; SCRATCH=$(mktemp -d)
cat "$OUT/machine.txt" > "$LOG"; rm "$OUT/machine.txt"
step() {  # step NAME COMMAND...: run, append its output to log.txt, record the exit status
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$LOG"
    "$@" > "$SCRATCH/step.log" 2>&1
    local rc=$?
    cat "$SCRATCH/step.log" >> "$LOG"
    echo "$name rc=$rc" >> "$OUT/summary.txt"
    tail -n 25 "$SCRATCH/step.log"
}

[ "${GPU_CHECKS_QUICK:-0}" = 1 ] || step gpu_tests "$PY" -m pytest -q -x tests/test_tensor_loader.py tests/test_dali_loader.py
step loader_throughput "$PY" benchmarks/loader_throughput.py --device "$DEVICE" --epochs "$LOADER_EPOCHS" \
    --warmup 1 "${LOADER_LIMIT[@]}" --json "$OUT/loader_throughput.json"
for variant in "${VARIANTS[@]}"; do
    tag=$(echo "$variant" | tr ' =' '_-')
    # shellcheck disable=SC2086  # the variant is several key=value words on purpose
    step "epoch_throughput_$tag" "$PY" benchmarks/epoch_throughput.py --steps "$STEPS" --warmup "$WARMUP" \
        --repeats 2 --json "$SCRATCH/epoch_throughput_$tag.json" device="$DEVICE" $variant
done
"$PY" - "$SCRATCH" > "$OUT/epoch_throughput.json" <<'EOF'
import json, pathlib, sys
print(json.dumps({p.stem.removeprefix("epoch_throughput_"): json.loads(p.read_text())
                  for p in sorted(pathlib.Path(sys.argv[1]).glob("epoch_throughput_*.json"))}, indent=1))
EOF

# Seed recipe epoch times; one metrics line per epoch, the second epoch is the timed one.
: > "$OUT/seed_epochs.jsonl"
for loader in albumentations tensor dali; do
    for variant in "${VARIANTS[@]}"; do
        run="$SCRATCH/run"; rm -rf "$run"
        # shellcheck disable=SC2086
        if "$PY" -m microtrain run recipes/cifar10_dsconv.yaml --run-dir "$run" epochs=2 device="$DEVICE" \
               loader.name="$loader" data.name=synthetic data.train_size="$TRAIN" data.test_size="$TEST" \
               'plugins=[metrics]' $variant > "$SCRATCH/seed.log" 2>&1; then
            "$PY" - "$run/metrics.jsonl" "$loader" "$variant" >> "$OUT/seed_epochs.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last = rows[-1]
print(json.dumps({"loader": sys.argv[2], "options": sys.argv[3], "epoch": last["epoch"],
                  "epoch_seconds": round(last["epoch_seconds"], 2),
                  "train_images_per_second": round(last["train_images_per_second"], 1)}))
EOF
        else
            echo "{\"loader\": \"$loader\", \"options\": \"$variant\", \"error\": $("$PY" -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().strip().splitlines()[-1][:300]))' "$SCRATCH/seed.log")}" >> "$OUT/seed_epochs.jsonl"
            cat "$SCRATCH/seed.log" >> "$LOG"
        fi
        tail -n 1 "$OUT/seed_epochs.jsonl"
    done
done
rm -rf "$SCRATCH"
cat "$OUT/summary.txt"
