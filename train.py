#!/usr/bin/env python3
"""Train a timm model (ours or timm's) with Hugging Face Accelerate: one CPU, one GPU, many GPUs, many nodes.

    python train.py                                   # embedded digits, ic_resnet20, a few minutes on CPU
    python train.py --recipe cifar_resnet110 --data-dir /data/cifar10 --output runs/r110
    python train.py --model ic_resnet50 --data-dir /data/imagenet --recipe imagenet_resnet50 --mixed-precision bf16
    accelerate launch --multi_gpu --num_processes 8 train.py --recipe imagenet_resnet50 --data-dir /data/imagenet
    python train.py --output runs/r110 --resume auto  # continue a run, mid-epoch included

The script is `timm_ic/training/train.py` (read it top to bottom: options, output folder, data, model, optimizer,
resume, the epoch loop; exit codes and the output folder's layout are in its docstring). It lives in the package
so that tests and benchmarks import it; this file is what `python train.py` and `accelerate launch` run.
"""
import sys

from timm_ic.training.train import main

if __name__ == '__main__':
    sys.exit(main())
