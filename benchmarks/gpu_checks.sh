#!/usr/bin/env bash
# The checks that need CUDA, in one pass for a lent GPU machine (device tool):
# AMP training through train.py, diagnostics under bf16 on the GPU, and both benchmarks.
#   bash benchmarks/gpu_checks.sh OUT_DIR
set -uo pipefail
out=${1:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
$py -c "import torch, timm, accelerate, huggingface_hub as h; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'hub', h.__version__, torch.cuda.get_device_name())"
step() { echo "=== $*"; local t=$SECONDS; "$@"; echo "--- rc=$? in $((SECONDS - t)) s"; }
step $py -c "
import torch, timm, timm_ic
from timm_ic.layers import Uout, ICLayer, create_norm, NORM_KINDS
x = torch.randn(32, 16, 8, 8, device='cuda', requires_grad=True)
for name in NORM_KINDS:
    for compiled in (False, True):
        m = torch.nn.Sequential(create_norm(name, 16), Uout(0.2)).cuda().train()
        f = torch.compile(m) if compiled else m
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y = f(x)
        y.float().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), name
        x.grad = None
print('layers: every norm + Uout, cuda bf16 autocast, eager and compiled: ok')
"
step $py train.py --epochs 2 --workers 2 --mixed-precision bf16 --channels-last --output "$out/run_bf16"
step $py train.py --epochs 2 --workers 2 --mixed-precision fp16 --compile --output "$out/run_fp16"
step $py -m timm_ic diagnose --model cifar_resnet20 --placement before_bn --compare after_bn --bf16 --device cuda --out "$out/diag"
# digits epochs take ~0.3 s on a GPU: many of them, so the medians are not noise
for precision in no bf16; do
    step $py benchmarks/bench_train.py --device cuda --workers 4 --epochs 10 --trials 5 --mixed-precision $precision
done
step $py benchmarks/bench_models.py --device cuda --amp --batch-size 64 --image-size 224 --steps 5
