set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
py=${PYTHON:-python3}; dev=${DEVICE:-cuda}
$py -m pytest -q -p no:cacheprovider tests/test_layers.py -k "cuda_dropouts or after_relu or same_seed or compile" 2>&1 | tail -4
only="ic_resnet20 ic_resnet110 kim_wrn28_10 uout_densenet_bc100 ic_resnet50 uout_densenet121"
args="--device $dev --amp --batch-size ${BATCH:-128} --image-size ${SIZE:-224} --steps 5 --repeats 4 --only $only"
echo "=== redraw (this tree)"; timeout 110 $py benchmarks/bench_models.py $args
echo "=== torch ops (before)"; timeout 110 $py .gpu/bench_torch_ops.py $args
