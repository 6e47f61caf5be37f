#!/usr/bin/env bash
# The data path's device checks in one short run (a few minutes on one H100/H200), for a session that
# is lent a GPU: the GPU tests (nvJPEG batch decode, bf16 default), the input path with nvJPEG
# beside the CPU paths, ResNet-50's training rate at 224 px with and without torch.compile, and
# the imagenet_paper10 plan from the measured rates. Everything under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_data_check.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
: "${OUT:?set OUT}"
mkdir -p "$OUT"
PY=${PY:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; nproc;
  cat /proc/loadavg; } > "$OUT/machine.txt" 2>&1
$PY -m pytest -q -m gpu tests/test_decode.py tests/test_gpu_settings.py > "$OUT/gpu_tests.txt" 2>&1
$PY benchmarks/data_throughput.py --rounds 3 --repeats 1 --ray-cpus "" --json "$OUT/data_throughput.json" \
    > "$OUT/data_throughput.txt" 2>&1
$PY benchmarks/train_throughput.py --backbone resnet50 --image-size 224 --batch 256 --steps 20 --device cuda \
    --json "$OUT/train_r50.json" > "$OUT/train_r50.txt" 2>&1
# torch.compile (train.compile): the same steps, bf16 + channels_last, compiled against eager; compile time apart.
$PY - > "$OUT/compile.txt" 2>&1 <<'PYEOF'
import time, torch
from supersub.resnet import ModelConfig, build_model
from supersub.epoch import OptimConfig, build_optimizer
dev = torch.device("cuda")
x = torch.randn(256, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (256,), device=dev)
for compiled in (False, True):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet50"), 1000, 224).to(dev).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, OptimConfig())
    run = torch.compile(model) if compiled else model
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    t0 = time.perf_counter(); step(); step(); torch.cuda.synchronize(); first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print(f"compile={compiled}: first 2 steps {first:.1f} s, then {20 * 256 / (time.perf_counter() - t0):.0f} img/s")
PYEOF
$PY -m jobs.pipeline --config jobs/configs/imagenet_paper10.yaml --plan --plan-throughput "$OUT/data_throughput.json" \
    --plan-throughput "$OUT/train_r50.json" --plan-json "$OUT/plan.json" > "$OUT/plan.txt" 2>&1
tail -n 20 "$OUT/data_throughput.txt" "$OUT/train_r50.txt" "$OUT/compile.txt" "$OUT/plan.txt"
exit 0
