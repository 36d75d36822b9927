"""Training images/s of train.py against a bare PyTorch loop, measured in the same run.

    python benchmarks/bench_train.py                          # CPU, ic_resnet20 on the digits, fp32
    python benchmarks/bench_train.py --mixed-precision bf16   # both sides under bf16 autocast
    python benchmarks/bench_train.py --device cuda            # on a GPU (train.py picks it up by itself)

train.py side: `train.main()` itself, in this process (progress bar, Accelerate, seeded augmentation, scheduler,
non-finite checks, everything), reading the images/s that it records per epoch in run.json; it times its
training loop only (evaluation and saving are outside it).
Bare side: the same model, data set, timm transforms, optimizer, batch size and precision, in a plain
`for x, y in DataLoader: forward, backward, step` loop, timed the same way.
Trials alternate between the two, the first epoch of every trial is left out (warm-up), and the medians
are compared. Target: train.py >= 0.95 x bare.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import timm
import torch
import torch.nn as nn
from accelerate.state import AcceleratorState, GradientState
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

import timm_ic  # noqa: F401  (registers the models)
from timm_ic.data import DigitsDataset
from timm_ic.training import train  # train.py's code



def train_py_trial(train, args, out: Path) -> List[float]:
    """Images/s of each epoch after the first, as train.py measured and recorded them."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = ['--model', args.model, '--epochs', str(args.epochs), '--batch-size', str(args.batch_size),
            '--input-size', '1', str(args.img_size), str(args.img_size), '--workers', str(args.workers),
            '--output', str(out), '--seed', '0']  # the recipe's own log interval: its syncs count too
    if args.mixed_precision != 'no':
        argv += ['--mixed-precision', args.mixed_precision]
    if args.device == 'cpu':
        argv += ['--cpu']
    code = train.main(argv)
    if code != 0:
        raise SystemExit(f'train.py failed with exit code {code}')
    record = json.loads((out / 'run.json').read_text())
    return [row['train_img_per_s'] for row in record['epochs'][1:]]


def bare_trial(train, args) -> List[float]:
    """The same work as a plain PyTorch loop: images/s of each epoch after the first."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    parsed = train.parse_args(['--model', args.model, '--input-size', '1', str(args.img_size), str(args.img_size)])
    model = timm.create_model(args.model, num_classes=10, in_chans=1)
    _, train_transform, _ = train.resolve_transforms(parsed, model, 1)  # the very same timm transforms
    dataset = DigitsDataset('train', transform=train_transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        pin_memory=device.type == 'cuda')
    model.to(device).train()
    optimizer = create_optimizer_v2(model, opt=parsed.opt, lr=parsed.lr, weight_decay=parsed.weight_decay,
                                    momentum=parsed.momentum)
    loss_fn = nn.CrossEntropyLoss()
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == 'fp16')  # as Accelerate does
    rates = []
    for epoch in range(args.epochs):
        samples = 0
        start = time.perf_counter()
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            samples += inputs.shape[0]
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if epoch > 0:
            rates.append(samples / (time.perf_counter() - start))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='ic_resnet20')
    parser.add_argument('--img-size', type=int, default=16, help='the digits demo size')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=4, help='per trial; the first is warm-up')
    parser.add_argument('--trials', type=int, default=3, help='per side, alternating')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--mixed-precision', choices=('no', 'bf16', 'fp16'), default='no')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours: List[float] = []
    bare: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            bare += bare_trial(train, args)
            ours += train_py_trial(train, args, Path(tmp) / f'trial{trial}')
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f'device {args.device}  model {args.model}  input 1x{args.img_size}x{args.img_size}  batch {args.batch_size}'
          f'  precision {args.mixed_precision}  threads {torch.get_num_threads()}  workers {args.workers}')
    print(f'bare PyTorch loop : median {statistics.median(bare):8.1f} img/s  (epochs: '
          f'{", ".join(f"{r:.0f}" for r in bare)})')
    print(f'train.py          : median {statistics.median(ours):8.1f} img/s  (epochs: '
          f'{", ".join(f"{r:.0f}" for r in ours)})')
    print(f'ratio train.py / bare = {ratio:.3f}  (target >= 0.95: {"met" if ratio >= 0.95 else "NOT met"})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
