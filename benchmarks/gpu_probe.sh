#!/usr/bin/env bash
# Short GPU call: the core benchmark and training throughput (no data needed), under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_probe.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
: "${OUT:?set OUT}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"; nproc; } > "$OUT/machine.txt" 2>&1
python3 benchmarks/core_bench.py --backbone resnet18 --image-size 64 --batch 256 --superclasses 11 --subclasses 18 \
    --json "$OUT/core_bench_b256.json" 2>&1 | tee "$OUT/core_bench_b256.txt"
python3 benchmarks/core_bench.py --backbone resnet18 --image-size 64 --batch 32 --superclasses 11 --subclasses 18 \
    --json "$OUT/core_bench_b32.json" 2>&1 | tee "$OUT/core_bench_b32.txt"
for w in 1.0 1.25; do
  python3 benchmarks/train_throughput.py --backbone resnet18 --width $w --image-size 64 --batch 256 --steps 40 \
      --json "$OUT/train_w$w.json" 2>&1 | tail -n 2
done
python3 benchmarks/train_throughput.py --backbone resnet18 --image-size 64 --batch 128 --steps 40 2>&1 | tail -n 2
