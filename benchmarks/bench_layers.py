"""Forward + backward time of timm-ic's dropout layers against torch's own, measured side by side in one run.

    python benchmarks/bench_layers.py                              # CPU, (128, 16, 32, 32) float32
    python benchmarks/bench_layers.py --shape 128 64 8 8 --repeats 51
    python benchmarks/bench_layers.py --device cuda --dtype bfloat16 --redraw-dropout   # the CUDA redraw kernel
    python benchmarks/bench_layers.py --after-relu        # ReLU then the layer, as a placement slot runs them

Each row times a forward and backward (`torch.autograd.grad`) of one of our layers and of torch's layer with the
same distribution (`nn.Dropout`; for Uout, x times `uniform_` noise, as Uout is written in torch ops),
alternating the two every repeat. The ratio is torch's time over ours: the median of the per-repeat ratios
[their interquartile range] (`bench_models.ratio_cell`). Our Bernoulli dropout draws the drops' positions at
rates up to 1/8 and 16 bits per unit above (`timm_ic.layers.dropout`), so the rows cover both. On CUDA our layers
take torch's own ops, unless `--redraw-dropout` (the one-pass Triton kernel that keeps a seed, not a mask).
`--after-relu` times a ReLU then the layer: ours as one op (`forward_after_relu`), torch's as `F.relu` then its layer.
"""
import argparse
import statistics
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_models import ratio_cell, time_step
from timm_ic.layers import Dropout, Uout, set_dropout_redraw


def torch_uout(beta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * torch.empty_like(x).uniform_(1.0 - beta, 1.0 + beta)


LAYERS = {  # row name: (ours, torch's)
    **{f'dropout p={p:g}': (Dropout(p), nn.Dropout(p)) for p in (0.05, 0.1, 0.2, 0.5)},
    'uout beta=0.2': (Uout(0.2), torch_uout(0.2)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', type=int, nargs='+', default=[128, 16, 32, 32])
    parser.add_argument('--steps', type=int, default=3, help='forward + backward passes per timing')
    parser.add_argument('--repeats', type=int, default=21)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--redraw-dropout', action='store_true',
                        help='CUDA: our layers keep a seed for backward and draw again there (`set_dropout_redraw`)')
    parser.add_argument('--after-relu', action='store_true',
                        help='a ReLU then the layer: ours `forward_after_relu`, torch\'s `F.relu` then its layer')
    args = parser.parse_args()
    for flag in ('steps', 'repeats'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    if any(s < 1 for s in args.shape):
        parser.error(f'--shape: every size must be at least 1, got {args.shape}')
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f'--threads must be at least 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device here')
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(*args.shape, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(*args.shape, device=device, dtype=dtype)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
    print(f'{where}, shape {tuple(args.shape)} {args.dtype}, {args.steps} steps x {args.repeats} repeats'
          + (', ours with redraw' if args.redraw_dropout else '') + (', after a ReLU' if args.after_relu else ''))
    cell = len(ratio_cell([1.0], [1.0]))
    print(f'{"layer":16s} {"ours ms":>8s} {"torch ms":>9s} {"speed-up":>{cell}s}')
    for name, (ours, theirs) in LAYERS.items():
        set_dropout_redraw(ours, args.redraw_dropout)
        for layer in (ours, theirs):
            if isinstance(layer, nn.Module):
                layer.train()
        times: Dict[str, List[float]] = {'ours': [], 'torch': []}
        # autograd.grad, not backward: no x.grad accumulating across runs
        ours_op = ours.forward_after_relu if args.after_relu else ours
        runs = {'ours': lambda: torch.autograd.grad(ours_op(x), x, g),
                'torch': lambda: torch.autograd.grad(theirs(F.relu(x) if args.after_relu else x), x, g)}
        for run in runs.values():  # warm-up
            run()
        for _ in range(args.repeats):
            for side, run in runs.items():
                times[side].append(time_step(run, device, args.steps))
        median = {side: statistics.median(t) * 1e3 for side, t in times.items()}
        print(f'{name:16s} {median["ours"]:8.2f} {median["torch"]:9.2f} {ratio_cell(times["ours"], times["torch"])}')


if __name__ == '__main__':
    main()
