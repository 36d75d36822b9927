"""The normalizer zoo of "Beyond BatchNorm" (Lubana et al. 2021), by name.

Everything timm.layers already implements is taken from there; only variance normalization (BatchNorm
without mean subtraction) is written here. Filter response norm and the EvoNorms carry their own
nonlinearity (TLU, SiLU-like gating): a unit that uses them drops its separate activation
(`NORMS_WITH_ACT`), as in the papers that introduced them.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d, GroupNorm, GroupNorm1, ScaledStdConv2d

__all__ = [
    'VarianceNorm2d', 'create_norm', 'create_conv', 'resolve_groups',
    'NORM_KINDS', 'NORMS_WITH_ACT', 'GROUPED_NORMS', 'CONV_KINDS',
]

DEFAULT_MAX_GROUPS = 32


class VarianceNorm2d(nn.Module):
    """BatchNorm without mean subtraction: y = x / sqrt(Var_batch[x] + eps) * weight + bias.

    Train mode divides by the biased batch variance (over N, H, W) and tracks its unbiased running
    average like BatchNorm; eval mode divides by the running variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        if self.training:
            # statistics in fp32 even under autocast, as BatchNorm does
            var = x.float().var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                self.running_var.lerp_(var * (n / max(n - 1, 1)), self.momentum)
        else:
            var = self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x * scale.view(shape).to(x.dtype)) + self.bias.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f'{self.num_features}, eps={self.eps}, momentum={self.momentum}'


def resolve_groups(num_channels: int, groups: Optional[int] = None, group_size: Optional[int] = None) -> int:
    """Number of groups for a grouped norm, checked against the channel count.

    With neither given: the largest divisor of `num_channels` up to 32 (GroupNorm's usual 32 groups where
    the width allows it, so one spec fits every width of a network).
    """
    if groups is not None and group_size is not None:
        raise ValueError('give the norm either groups or group_size, not both')
    if group_size is not None:
        if group_size < 1 or num_channels % group_size:
            valid = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
            raise ValueError(f'group_size={group_size} does not divide {num_channels} channels; valid: {valid}')
        return num_channels // group_size
    if groups is not None:
        if groups < 1 or num_channels % groups:
            valid = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
            raise ValueError(f'groups={groups} does not divide {num_channels} channels; valid: {valid}')
        return groups
    return max(d for d in range(1, min(num_channels, DEFAULT_MAX_GROUPS) + 1) if num_channels % d == 0)


def _groupnorm(c: int, groups: Optional[int], group_size: Optional[int]) -> nn.Module:
    return GroupNorm(c, num_groups=resolve_groups(c, groups, group_size))


def _evonorm_s0(c: int, groups: Optional[int], group_size: Optional[int]) -> nn.Module:
    return EvoNorm2dS0(c, groups=resolve_groups(c, groups, group_size))


# name -> builder(num_channels, groups, group_size)
NORM_KINDS: Dict[str, Callable[[int, Optional[int], Optional[int]], nn.Module]] = {
    'batchnorm': lambda c, g, s: nn.BatchNorm2d(c),
    'groupnorm': _groupnorm,
    'layernorm': lambda c, g, s: GroupNorm1(c),  # one group: normalizes over (C, H, W)
    'instancenorm': lambda c, g, s: GroupNorm(c, num_groups=c),  # one channel per group, per-channel affine
    'frn': lambda c, g, s: FilterResponseNormTlu2d(c),
    'evonorm_b0': lambda c, g, s: EvoNorm2dB0(c),
    'evonorm_s0': _evonorm_s0,
    'variancenorm': lambda c, g, s: VarianceNorm2d(c),
    'none': lambda c, g, s: nn.Identity(),
}
NORMS_WITH_ACT = frozenset({'frn', 'evonorm_b0', 'evonorm_s0'})
GROUPED_NORMS = frozenset({'groupnorm', 'evonorm_s0'})
CONV_KINDS: Tuple[str, ...] = ('conv', 'ws')


def create_norm(
        name: str,
        num_channels: int,
        groups: Optional[int] = None,
        group_size: Optional[int] = None,
) -> nn.Module:
    """A 2d normalizer by name (`NORM_KINDS`); `groups` / `group_size` apply to the grouped ones."""
    if name not in NORM_KINDS:
        raise ValueError(f'unknown norm {name!r}; valid: {sorted(NORM_KINDS)}')
    if (groups is not None or group_size is not None) and name not in GROUPED_NORMS:
        raise ValueError(f'norm {name!r} takes no groups; grouped norms: {sorted(GROUPED_NORMS)}')
    return NORM_KINDS[name](num_channels, groups, group_size)


def _ws_gamma() -> float:
    # the gain that keeps ReLU's output variance at 1 under weight standardization (NF-ResNets)
    from timm.models.nfnet import _nonlin_gamma
    return _nonlin_gamma['relu']


def create_conv(kind: str, conv: nn.Conv2d) -> nn.Conv2d:
    """The weight layer `conv` as conv kind `kind`, keeping its weights.

    'conv' returns it unchanged; 'ws' returns timm's ScaledStdConv2d (scaled weight standardization)
    with the same geometry and the same weight and bias tensors.
    """
    if kind not in CONV_KINDS:
        raise ValueError(f'unknown conv kind {kind!r}; valid: {list(CONV_KINDS)}')
    if kind == 'conv' or isinstance(conv, ScaledStdConv2d):
        return conv
    if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str):
        raise ValueError(f'cannot weight-standardize {type(conv).__name__} with padding {conv.padding!r}')
    ws = ScaledStdConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, gamma=_ws_gamma(),
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    ws.weight = conv.weight
    if conv.bias is not None:
        ws.bias = conv.bias
    return ws
