#!/usr/bin/env bash
# One GPU session (the lent NVIDIA H200; no Ray, no MLflow there): the core and training benchmarks,
# then the Tiny-ImageNet study with its controls in-process, everything logged under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh              # on the GPU machine
#   OUT=/tmp/out SMOKE=1 bash benchmarks/gpu_session.sh      # tiny settings, to test it on a CPU
#
# Data: .devdata/tiny/ holds Parquet shards of Tiny-ImageNet (a subset: what fits the transfer
# limit) and .devdata/tiny_auto10.json the auto:10 hierarchy (leftover: other) made here with
# `supersub hierarchy save auto:10 --classes wnids.txt --imagenet-meta ... --leftover other`.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
: "${OUT:?set OUT}"
BUDGET=${BUDGET:-330}
STUDY_DIR=${STUDY_DIR:-/tmp/supersub-study}
mkdir -p "$OUT"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())";
  nproc; } > "$OUT/machine.txt" 2>&1

common=(data.source=.devdata/tiny data.hierarchy=.devdata/tiny_auto10.json
        data.learned_from=.devdata/tiny_auto10.json data.imagenet_meta=null data.num_workers=$(nproc)
        tracking.enabled=false)
if [ -n "${SMOKE:-}" ]; then
  bench=(--backbone resnet10 --width 0.25 --image-size 32 --batch 16 --repeats 2 --superclasses 3 --subclasses 4)
  engine=(--hierarchy synthetic:3x4 --backbone resnet10 --width 0.25 --stem auto --image-size 32 --batch 16 --rounds 2)
  tp=(--backbone resnet10 --width 0.25 --image-size 32 --batch 16 --steps 3)
  common+=(data.max_train_per_class=8 data.image_size=32 model.backbone=resnet10 model.width=0.25 train.epochs=1 train.batch_size=64
           specialist.optim.epochs=1 data.num_workers=2 baselines.scaled_width=0.5)
else
  bench=(--backbone resnet18 --image-size 64 --batch 256 --superclasses 11 --subclasses 18)
  engine=(--device cuda)  # the paper's shape: ResNet-50 @ 224 px, paper10's 10 specialists, batch 32
  tp=(--backbone resnet18 --image-size 64 --batch 256)
fi

python3 benchmarks/core_bench.py "${bench[@]}" --json "$OUT/core_bench.json" > "$OUT/core_bench.txt" 2>&1
python3 benchmarks/engine_bench.py "${engine[@]}" --json "$OUT/engine_bench.json" > "$OUT/engine_bench.txt" 2>&1
python3 benchmarks/train_throughput.py "${tp[@]}" --json "$OUT/train_throughput.json" > "$OUT/train_throughput.txt" 2>&1
tail -n 12 "$OUT/core_bench.txt"
tail -n 14 "$OUT/engine_bench.txt"

# Copy the study's summary out as it grows, so a run stopped by its time limit still reports.
( while sleep 5; do cp "$STUDY_DIR/study.json" "$OUT/study.json" 2>/dev/null; done ) &
copier=$!
python3 -m jobs.study --study jobs/configs/study_tiny_imagenet.yaml --out "$STUDY_DIR" \
    --time-budget-s "$BUDGET" "${common[@]}" 2>&1 | tee "$OUT/study.log" | grep -v " epoch [0-9]*/" 
kill $copier 2>/dev/null
cp "$STUDY_DIR/study.json" "$OUT/study.json" 2>/dev/null
[ -f "$STUDY_DIR/study.md" ] && cp "$STUDY_DIR/study.md" "$OUT/study.md"
exit 0
