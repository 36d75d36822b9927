#!/usr/bin/env bash
# The checks that need CUDA, in one pass for a lent GPU machine (device tool), most wanted first, each under its
# own time limit so that one slow step cannot starve the rest:
#   1. the redraw kernel (Triton, not yet run on a GPU): its tests on CUDA, then bench_layers.py against torch's
#      dropout and Uout at a 224 px and a 32 px activation size, bf16;
#   2. bench_models.py, every pair, eager, bf16, with --redraw-dropout (dropouts keep a seed, not their masks, for
#      backward), then without: training, peak memory, folded inference (issue 13's GPU targets);
#   3. training through torch.compile, for one ImageNet pair (224 px) and one CIFAR pair (32 px);
#   4. the layers' tests on CUDA; every normalizer with Uout under bf16 autocast, eager and compiled; train.py
#      under bf16 (channels-last, --redraw-dropout) and fp16 (--compile); `timm-ic diagnose` on the GPU;
#      bench_train.py.
#   bash benchmarks/gpu_checks.sh OUT_DIR        # SCALE=0.1 for a quick pass (CPU: DEVICE=cpu)
set -uo pipefail
out=${1:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
scale=${SCALE:-1}  # time limits and sizes; below 1 for a dry run of the script itself
limit() { awk -v s="$1" -v k="$scale" 'BEGIN { v = int(s * k); print (v < 5 ? 5 : v) }'; }
step() {  # step SECONDS cmd...: the command under a time limit, with its exit status and time
    local seconds; seconds=$(limit "$1"); shift
    echo "=== $* (limit ${seconds} s)"; local t=$SECONDS
    timeout -k 10 "$seconds" "$@"; echo "--- rc=$? in $((SECONDS - t)) s"
}
$py -c "import torch, timm, accelerate, huggingface_hub as h; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'hub', h.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
if [ "$scale" = 1 ]; then batch=128 size=224 steps=5 repeats=5; else batch=4 size=64 steps=1 repeats=1; fi
bench="$py benchmarks/bench_models.py --device $device --amp --batch-size $batch --image-size $size --steps $steps"
step 180 $py -m pytest -q -p no:cacheprovider tests/test_layers.py -k redraw
if [ "$scale" = 1 ]; then shapes=("128 64 56 56" "128 16 32 32"); else shapes=("4 8 16 16"); fi
for shape in "${shapes[@]}"; do
    step 60 $py benchmarks/bench_layers.py --device $device --dtype bfloat16 --redraw-dropout --shape $shape \
        --steps $steps --repeats $((repeats * 4))
done
step 240 $bench --repeats $repeats --redraw-dropout
step 300 $bench --repeats $repeats
step 150 $bench --repeats 3 --no-memory --compile --only ic_resnet50
step 100 $bench --repeats 3 --no-memory --compile --only ic_resnet20
step 120 $py -m pytest -q -p no:cacheprovider tests/test_layers.py
step 90 $py -c "
import torch, timm, timm_ic
from timm_ic.layers import Uout, ICLayer, create_norm, NORM_KINDS
x = torch.randn(32, 16, 8, 8, device='$device', requires_grad=True)
for name in NORM_KINDS:
    for compiled in (False, True):
        m = torch.nn.Sequential(create_norm(name, 16), Uout(0.2)).to('$device').train()
        f = torch.compile(m) if compiled else m
        with torch.autocast('$device', dtype=torch.bfloat16):
            y = f(x)
        y.float().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), name
        x.grad = None
print('layers: every norm + Uout, $device bf16 autocast, eager and compiled: ok')
"
cpu_flag=$([ "$device" = cpu ] && echo --cpu)
step 60 $py train.py --epochs 2 --workers 2 --mixed-precision bf16 --channels-last --redraw-dropout $cpu_flag --output "$out/run_bf16"
step 60 $py -m timm_ic diagnose --model cifar_resnet20 --placement before_bn --compare after_bn --bf16 --device "$device" --out "$out/diag"
step 90 $py train.py --epochs 2 --workers 2 --mixed-precision fp16 --compile $cpu_flag --output "$out/run_fp16"
# digits epochs take ~0.3 s on a GPU: many of them, so the medians are not noise
for precision in no bf16; do
    step 90 $py benchmarks/bench_train.py --device "$device" --workers 4 --epochs 10 --trials 5 --mixed-precision $precision
done
