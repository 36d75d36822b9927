"""Dropout kinds and the IC layer.

- Uout (Li et al. 2019): multiplicative uniform noise, x + x * r with r ~ U(-beta, beta) per element.
  Its train/test variance shift is 3 / (3 + beta^2) for zero-mean input, against p_keep for Bernoulli dropout.
- IC layer (Chen et al. 2019): a normalizer followed by a dropout, placed right before a weight layer.
  BN centres the units so that dropout's gates scale pairwise correlation by p_keep.

Training speed on CPU: torch's `F.dropout` and `uniform_` spend most of their time drawing a random float per
element, then make several full passes (mask, scale, multiply). On CPU both layers here draw 16 bits per element
(64-bit words from torch's own generator, read as four 16-bit integers), keep a 1-byte mask (Uout: the 2-byte draws)
for backward, and apply mask and scale in a custom autograd function. The draws come from torch's default generator,
so `torch.manual_seed`, `torch.get_rng_state` / `set_rng_state` (exact resume) and activation checkpointing work as
before. 16 bits fix the granularity: a Bernoulli drop probability is a multiple of 1/65536 (the requested one
rounded, off by at most 2^-17), Uout's noise takes 65536 equally likely values, the midpoints of an even split of
[1 - beta, 1 + beta]. Other devices (GPU, meta), TorchScript, and rates too small for 16 bits use torch's own
ops, which are already the fastest there; so does torch.compile (inductor draws its own fused random numbers,
seeded from torch's generator).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .norm import create_norm

__all__ = ['Dropout', 'Uout', 'ICLayer', 'create_dropout', 'DROP_KINDS', 'dropout', 'uout']

DROP_KINDS = ('dropout', 'uout', 'none')

LEVELS = 1 << 16  # values of one 16-bit draw
# below this many of LEVELS on either side, rounding p to a multiple of 1/LEVELS would move it by more than ~1%
# of itself: such rates take torch's exact F.dropout
MIN_LEVELS = 64


def check_drop_rate(drop_rate: float) -> float:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f'drop_rate must be in [0, 1) (the probability of zeroing a unit), got {drop_rate}')
    return float(drop_rate)


def check_beta(beta: float) -> float:
    if not beta >= 0.0:
        raise ValueError(f'Uout beta must be >= 0 (noise r ~ U(-beta, beta)), got {beta}')
    return float(beta)


def random_int16(like: torch.Tensor) -> torch.Tensor:
    """Uniform int16 in [-32768, 32767], one per element of `like`, from torch's default generator.

    `random_(-2**63, None)` fills an int64 with all 64 bits random (the default range leaves the sign bit 0),
    so each of its four 16-bit pieces is uniform and independent of the others."""
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-2 ** 63, None)
    return words.view(torch.int16)[:n].view(like.shape)


def _fast_path(x: torch.Tensor) -> bool:
    # CPU only: CUDA's fused dropout kernel (Philox, one pass) is already faster than anything composed here.
    # Not under torch.compile: dynamo cannot trace random_(from, None), and inductor fuses torch's own ops
    return x.device.type == 'cpu' and not torch.compiler.is_compiling()


# Both functions build their output in the one tensor they allocate (mask or noise, then in-place multiplies): on
# CPU a fresh tensor's first touch (page faults) costs about as much as a pass over it.

class _MaskScale(torch.autograd.Function):
    """y = x * keep * scale in forward, grad * keep * scale in backward; keeps only the 1-byte mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(keep)
        # bool -> float is a slow conversion on CPU; uint8 -> float (the same bytes) is not
        return keep.view(torch.uint8).to(x.dtype).mul_(x).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        keep, = ctx.saved_tensors
        return keep.view(torch.uint8).to(grad.dtype).mul_(grad).mul_(ctx.scale), None, None


class _Uout(torch.autograd.Function):
    """y = x * u with u = 1 + beta * (k + 1/2) / 32768 from 16-bit draws k; keeps only the 2-byte draws."""

    @staticmethod
    def noise(draws: torch.Tensor, beta: float, dtype: torch.dtype) -> torch.Tensor:
        # in at least float32: bfloat16 would round the 65536 values to a few hundred
        step = beta / (LEVELS // 2)
        u = draws.to(torch.promote_types(dtype, torch.float32)).mul_(step).add_(1.0 + step / 2)
        return u.to(dtype)

    @staticmethod
    def forward(ctx, x: torch.Tensor, draws: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.beta = beta
        ctx.save_for_backward(draws)
        return _Uout.noise(draws, beta, x.dtype).mul_(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        draws, = ctx.saved_tensors
        # regenerated from the saved draws: 2 bytes per element kept instead of the 4 of a float noise tensor
        return _Uout.noise(draws, ctx.beta, grad.dtype).mul_(grad), None, None


def drop_levels(p: float) -> int:
    """How many of the 65536 values of a 16-bit draw drop a unit: round(p * 65536)."""
    return round(p * LEVELS)


@torch.fx.wrap
@register_notrace_function
@torch.jit.unused
def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Bernoulli dropout, `F.dropout`'s contract; on CPU p is rounded to a multiple of 1/65536 (see module doc)."""
    levels = drop_levels(p)
    if not training or p == 0.0 or not _fast_path(x) or min(levels, LEVELS - levels) < MIN_LEVELS:
        return F.dropout(x, p, training)
    # k drops iff k < levels - 32768: probability exactly levels / 65536; the scale keeps E[y] = x exactly
    keep = random_int16(x) >= levels - LEVELS // 2
    return _MaskScale.apply(x, keep, LEVELS / (LEVELS - levels))


@torch.fx.wrap
@register_notrace_function
@torch.jit.unused
def uout(x: torch.Tensor, beta: float, training: bool = True) -> torch.Tensor:
    """Uout: x * u with u ~ U(1 - beta, 1 + beta) per element in training, x in eval (see module doc on CPU)."""
    if not training or beta == 0.0:
        return x
    if not _fast_path(x):
        # x + x * r with r ~ U(-beta, beta), as one multiply: 1 + r ~ U(1 - beta, 1 + beta)
        return x * torch.empty_like(x).uniform_(1.0 - beta, 1.0 + beta)
    return _Uout.apply(x, random_int16(x), beta)


class Dropout(nn.Dropout):
    """`nn.Dropout` drawing its mask through `dropout` above: faster on CPU, the same as `nn.Dropout` elsewhere.

    A subclass, so code that looks for torch dropouts (`isinstance(m, nn.Dropout)`, `m.p`) still finds it."""

    def __init__(self, p: float = 0.5):
        super().__init__(check_drop_rate(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.dropout(x, self.p, self.training)
        return dropout(x, self.p, self.training)


class Uout(nn.Module):
    """Uniform multiplicative noise: training x + x * r, r ~ U(-beta, beta) drawn per element; eval identity.

    The default beta 0.2 is our choice: it is the one setting Li et al. 2019 report an accuracy result for
    (CIFAR-100, DenseNet and WRN), not a recommendation of theirs for every network.
    """

    def __init__(self, beta: float = 0.2):
        super().__init__()
        self.beta = check_beta(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.beta == 0.0:
            return x
        if torch.jit.is_scripting():
            return x * torch.empty_like(x).uniform_(1.0 - self.beta, 1.0 + self.beta)
        return uout(x, self.beta)

    def extra_repr(self) -> str:
        return f'beta={self.beta}'


def create_dropout(kind: str = 'dropout', drop_rate: float = 0.0, beta: float = 0.0) -> nn.Module:
    """A dropout module by kind: 'dropout' (Bernoulli, `drop_rate`), 'uout' (`beta`) or 'none'."""
    if kind not in DROP_KINDS:
        raise ValueError(f'unknown dropout kind {kind!r}; valid: {list(DROP_KINDS)}')
    drop_rate, beta = check_drop_rate(drop_rate), check_beta(beta)
    if kind == 'dropout' and drop_rate > 0.0:
        return Dropout(drop_rate)
    if kind == 'uout' and beta > 0.0:
        return Uout(beta)
    return nn.Identity()


class ICLayer(nn.Sequential):
    """Independent-Component layer: normalizer then dropout, to sit right before a weight layer."""

    def __init__(
            self,
            num_features: int,
            norm: str = 'batchnorm',
            drop: str = 'dropout',
            drop_rate: float = 0.05,
            beta: float = 0.0,
            groups: Optional[int] = None,
            group_size: Optional[int] = None,
    ):
        super().__init__()
        self.norm = create_norm(norm, num_features, groups=groups, group_size=group_size)
        self.drop = create_dropout(drop, drop_rate=drop_rate, beta=beta)
