"""The floor under a model's CPU dropouts in training: what their draws cost alone, and what a perfectly fused
multiply would add, against the model's same-skeleton baseline, measured in one run.

For one model of `timm_ic.models.BASELINES` (default `uout_densenet_bc100`) and its baseline, times eager training
steps with every `timm_ic.layers.Dropout` and `Uout` of the model run as:

    none      the identity (a ReLU before it kept): the skeleton without dropout
    draws     its draws from torch's generator as ours makes them (`_cpu_draw`), then the identity
    one-pass  those draws, then one elementwise pass forward and one backward, a ReLU before it folded in: what a
              fused CPU kernel that keeps torch's generator could at best cost (it would read the draws too)
    ours      the layer as it is

and prints each variant's training speed over the baseline's: the median of the per-repeat ratios [their
interquartile range]. Repeats interleave baseline and variants, so drift hits all alike.

    python benchmarks/bench_dropout_floor.py
    python benchmarks/bench_dropout_floor.py --model kim_preresnet110 --batch-size 64 --repeats 11
"""
import argparse
import contextlib
from typing import Callable, Dict, Iterator, List, Optional

import timm
import torch
import torch.nn.functional as F

from bench_models import build, ratio_cell, time_step
from timm_ic.layers import Dropout, Uout
from timm_ic.layers.dropout import _cpu_draw, _cpu_dropout_kind
from timm_ic.models import BASELINES


def draw(layer: torch.nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """What `layer` draws for x on CPU in training, as `dropout` and `uout` pick it; None where they draw nothing
    of ours (rate or beta 0; rates within 64/65536 of 1, where `dropout` takes `F.dropout`: no model has one)."""
    if isinstance(layer, Uout):
        return _cpu_draw('uout', x, layer.beta) if layer.beta > 0.0 else None
    kind = _cpu_dropout_kind(layer.p) if layer.p > 0.0 else None
    return None if kind is None else _cpu_draw(kind, x, layer.p)


class _OnePass(torch.autograd.Function):
    """One pass each way: forward writes a fresh output from x, backward a fresh gradient; keeps the draws (and,
    after a ReLU, its output) for backward, as ours does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drawn: Optional[torch.Tensor], after_relu: bool) -> torch.Tensor:
        y = torch.clamp_min(x, 0.0) if after_relu else torch.mul(x, 1.0)
        ctx.save_for_backward(drawn, y if after_relu else None)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _, relu_out = ctx.saved_tensors
        return (torch.mul(grad, 1.0) if relu_out is None
                else torch.ops.aten.threshold_backward(grad, relu_out, 0)), None, None


VARIANTS: Dict[str, Callable[[torch.nn.Module, torch.Tensor, bool], torch.Tensor]] = {
    'none': lambda layer, x, after_relu: F.relu(x) if after_relu else x,
    'draws': lambda layer, x, after_relu: (draw(layer, x), F.relu(x) if after_relu else x)[1],
    'one-pass': lambda layer, x, after_relu: _OnePass.apply(x, draw(layer, x), after_relu),
}


@contextlib.contextmanager
def dropouts_as(variant: str) -> Iterator[None]:
    """Every Dropout and Uout in training runs as `variant` (VARIANTS) while inside; 'ours' changes nothing."""
    if variant == 'ours':
        yield
        return
    run = VARIANTS[variant]
    saved = {cls: (cls.forward, cls.forward_after_relu) for cls in (Dropout, Uout)}
    try:
        for cls in saved:
            cls.forward = lambda self, x: run(self, x, False) if self.training else x
            cls.forward_after_relu = lambda self, x: run(self, x, True) if self.training else F.relu(x)
        yield
    finally:
        for cls, (forward, forward_after_relu) in saved.items():
            cls.forward, cls.forward_after_relu = forward, forward_after_relu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='uout_densenet_bc100', help='a model of timm_ic.models.BASELINES')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--image-size', type=int, default=112, help='input size for the ImageNet models')
    parser.add_argument('--steps', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    if args.model not in BASELINES:
        parser.error(f'--model: {args.model!r} has no baseline pair; valid: {sorted(BASELINES)}')
    for flag in ('steps', 'repeats', 'batch_size', 'image_size'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be at least 1, got {getattr(args, flag)}')
    torch.manual_seed(0)
    baseline = BASELINES[args.model]
    size = 32 if timm.get_pretrained_cfg(baseline).input_size[-1] == 32 else args.image_size
    x = torch.randn(args.batch_size, 3, size, size)
    base_train = build(baseline, x, False)[2]
    model, _, model_train = build(args.model, x, False)
    if not any(isinstance(m, (Dropout, Uout)) for m in model.modules()):
        parser.error(f'--model: {args.model} has no timm_ic Dropout or Uout to replace; pick an IC, Kim or Uout model')
    variants = ['none', 'draws', 'one-pass', 'ours']
    base_train()
    for variant in variants:  # warm-up
        with dropouts_as(variant):
            model_train()
    times: Dict[str, List[float]] = {v: [] for v in ['baseline', *variants]}
    for _ in range(args.repeats):  # each variant's ratio pairs it with the baseline timed right before it
        for variant in variants:
            times['baseline'].append(time_step(base_train, x.device, args.steps))
            with dropouts_as(variant):
                times[variant].append(time_step(model_train, x.device, args.steps))
    print(f'{args.model} against {baseline}, cpu, batch {args.batch_size}, {size} px, '
          f'steps {args.steps} x {args.repeats} repeats, training speed over the baseline\'s:')
    for i, variant in enumerate(variants):
        paired = times['baseline'][i::len(variants)]
        print(f'{variant:9s} {ratio_cell(times[variant], paired)}')


if __name__ == '__main__':
    main()
