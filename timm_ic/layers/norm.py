"""The normalizer zoo of "Beyond BatchNorm" (Lubana et al. 2021), by name.

Everything timm.layers already implements is taken from there; only variance normalization (BatchNorm
without mean subtraction) and FRN's TLU on its own are written here. Filter response norm and the EvoNorms
carry their own nonlinearity (TLU, SiLU-like gating): a unit that uses them drops its separate activation
(`NORMS_WITH_ACT`), as in the papers that introduced them. Where a norm must come without its nonlinearity
(the last norm of a post-activation residual branch, before the sum; a projection shortcut),
`split_norm_act` gives the two parts as Lubana et al.'s reference code does: FRN without TLU then a TLU,
or no norm then the whole EvoNorm.

Grouped norms (GroupNorm, EvoNorm-S0) default to the largest divisor of the width up to 32 groups. The group
size that gives depends on the width: 1 (InstanceNorm in all but name) on widths up to 32, such as the
16 / 32 / 64 channels of the CIFAR ResNets (group sizes 1, 1, 2) and the 16-channel stem of every CIFAR
skeleton; 5 / 10 / 20 on the 160 / 320 / 640 of WRN-28-10; 2 / 4 / 8 / 16 / 32 / 64 on the 64 to 2048
channels of the ImageNet ResNets. Lubana et al. 2021 find that the
behaviour depends on group size, so give `groups` or `group_size` where it matters.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d, GroupNorm, GroupNorm1, ScaledStdConv2d

__all__ = [
    'VarianceNorm2d', 'TLU', 'create_norm', 'split_norm_act', 'create_conv', 'resolve_groups',
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


class TLU(nn.Module):
    """Thresholded linear unit, max(x, tau) with a learned tau per channel (tau starts at 0, as in FRN):
    the nonlinearity of timm's FilterResponseNormTlu2d on its own, to follow a residual sum."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.tau.view(1, -1, 1, 1).to(x.dtype))

    def extra_repr(self) -> str:
        return f'{self.num_features}'


def resolve_groups(num_channels: int, groups: Optional[int] = None, group_size: Optional[int] = None) -> int:
    """Number of groups for a grouped norm, checked against the channel count.

    With neither given: the largest divisor of `num_channels` up to 32 (GroupNorm's usual 32 groups where
    the width allows it, so one spec fits every width of a network). On 32 channels or fewer that is one
    channel per group: InstanceNorm (see the module docstring for the group size per width).
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


def split_norm_act(
        name: str,
        num_channels: int,
        groups: Optional[int] = None,
        group_size: Optional[int] = None,
) -> Tuple[nn.Module, Optional[nn.Module]]:
    """(the norm without a nonlinearity, the nonlinearity it carries or None), as Lubana et al. 2021's
    reference code splits them: FRN without TLU and a TLU; for the EvoNorms, whose nonlinearity does not
    come apart from their normalization, no norm (Identity) and the whole EvoNorm. Other norms: (norm, None).
    """
    if name == 'frn':
        return FilterResponseNormTlu2d(num_channels, apply_act=False), TLU(num_channels)
    if name in NORMS_WITH_ACT:
        return nn.Identity(), create_norm(name, num_channels, groups=groups, group_size=group_size)
    return create_norm(name, num_channels, groups=groups, group_size=group_size), None


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
