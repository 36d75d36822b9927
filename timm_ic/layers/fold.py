"""Folding eval-mode BatchNorm into the weight layer next to it, exactly, borders included.

BN in eval is a per-channel affine map y = a * x + b (a = weight / sqrt(running_var + eps),
b = bias - a * running_mean). After a conv it folds into the conv's weight and bias (the standard fold).
Before a conv it folds into the weight (scaled by `a` per input channel) plus the conv of the constant
image `b`: inside, that is a constant per output channel; on the border it is not, since the conv's zero
padding pads BN(x), not x. A conv without padding gets it as a bias; a padded conv gets it as a per-output-size
bias map (`BiasMapConv2d`), which stays exact whatever `a` is (a shift x + b / a would divide by a zero or
tiny `a`, e.g. the zero-init last BN of a block).

Between two convs, ReLU then BN (the IC layer's order) folds into the conv before the ReLU, with no bias map:
a * relu(x) + b = s * max(|a| x + s b, s b) for s the sign of a, so the first conv takes |a| and s b (the standard
fold), the ReLU becomes a per-channel floor s b (`ClampMin2d`), and s goes into the second conv's input channels
(zero padding commutes with a per-channel sign).

Only plain `nn.BatchNorm2d` with running statistics folds, and only into a plain `nn.Conv2d` / `nn.Linear`
(a weight-standardized conv normalizes its weight: a scale would be undone). Other norms (GN, LN, FRN...)
depend on the sample and stay.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .dropout import Dropout, Uout

__all__ = ['BiasMapConv2d', 'ClampMin2d', 'bn_affine', 'is_eval_identity', 'fold_bn_after_conv',
           'fold_bn_after_relu', 'fold_bn_before_conv', 'fold_bn_before_linear', 'can_fold_into']


def bn_affine(bn: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) with bn(x) = a * x + b per channel in eval, or None when `bn` is not a foldable BatchNorm."""
    # exact type: timm's BatchNormAct2d (a subclass) carries an activation
    if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.running_var is None:
        return None
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    b = -bn.running_mean * a
    if bn.bias is not None:
        b = b + bn.bias
    return a.detach(), b.detach()


def is_eval_identity(m: nn.Module) -> bool:
    """Modules that are the identity in eval (dropouts), so a BN folds across them."""
    return isinstance(m, (nn.Identity, nn.Dropout, Dropout, Uout))


def can_fold_into(m: nn.Module, before: bool) -> bool:
    """Whether a BN before (`before`) or after `m` folds into it: plain convs with zero padding (a folded
    conv takes a BN after it, not before), and linears."""
    convs = (nn.Conv2d,) if before else (nn.Conv2d, BiasMapConv2d)
    return type(m) in convs and m.padding_mode == 'zeros' and not isinstance(m.padding, str)


def _per_input(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A per-input-channel vector laid out like conv.weight's (out, in / groups) dims."""
    g = conv.groups
    return a.view(g, -1).repeat_interleave(conv.out_channels // g, dim=0)[:, :, None, None]


@register_notrace_module  # a leaf for timm's FX feature extraction: its cache is Python control flow
class BiasMapConv2d(nn.Conv2d):
    """conv(x) + conv(pad0(constant image)) with the constant's conv (`bias_weight`) kept apart: what a
    padded conv after a BN becomes. The map depends on the input size only, so it is cached per size."""

    max_cached_maps = 8  # input sizes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer('bias_weight', torch.zeros_like(self.weight))
        self._maps: Dict[Tuple, torch.Tensor] = {}

    def bias_map(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, self.in_channels, *x.shape[2:], dtype=x.dtype, device=x.device)
        return F.conv2d(ones, self.bias_weight.to(x.dtype), None, self.stride, self.padding, self.dilation,
                        self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() or self.training:
            m = self.bias_map(x)  # no cache: traced into the graph, or weights may still change
        else:
            key = (tuple(x.shape[2:]), x.dtype, x.device)
            m = self._maps.get(key)
            if m is None:
                if len(self._maps) >= self.max_cached_maps:
                    del self._maps[next(iter(self._maps))]  # the oldest
                m = self._maps[key] = self.bias_map(x)
        # in place on the conv's fresh output: no third activation-sized tensor, which on CPU costs about as much
        # as the add itself (a fresh allocation's page faults); autograd-safe, conv's backward does not read it
        return super().forward(x).add_(m)

    def _apply(self, fn, recurse=True):
        self._maps = {}  # device / dtype changes
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._maps = {}  # new bias_weight
        return super()._load_from_state_dict(*args, **kwargs)


def _conv_like(conv: nn.Conv2d, cls, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Conv2d:
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=conv.groups, bias=bias is not None,
              device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=conv.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.weight.requires_grad)
    return new.train(conv.training)  # an eval BiasMapConv2d caches its map


@torch.no_grad()
def fold_bn_before_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A conv computing conv(bn(x)) in eval: an `nn.Conv2d` when `conv` has no padding, else a `BiasMapConv2d`."""
    a, b = bn_affine(bn)
    w = conv.weight
    weight = w * _per_input(a.to(w.dtype), conv)
    wb = w * _per_input(b.to(w.dtype), conv)  # the constant image b's contribution
    padded = any(p != 0 for p in conv.padding)
    if not padded:
        bias = wb.sum((1, 2, 3)) + (conv.bias if conv.bias is not None else 0.0)
        return _conv_like(conv, nn.Conv2d, weight, bias)
    new = _conv_like(conv, BiasMapConv2d, weight, conv.bias)
    new.bias_weight.copy_(wb)
    return new


@torch.no_grad()
def fold_bn_after_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The standard fold: a conv computing bn(conv(x)) in eval."""
    return _affine_after_conv(conv, *bn_affine(bn))


@torch.no_grad()
def _affine_after_conv(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> nn.Conv2d:
    """A conv computing a * conv(x) + b per output channel."""
    w = conv.weight
    a_out = a.to(w.dtype)[:, None, None, None]
    bias = b.to(w.dtype) + (a.to(w.dtype) * conv.bias if conv.bias is not None else 0.0)
    new = _conv_like(conv, type(conv), w * a_out, bias)
    if isinstance(conv, BiasMapConv2d):
        new.bias_weight.copy_(conv.bias_weight * a_out)
    return new


class ClampMin2d(nn.Module):
    """max(x, floor) per channel: a ReLU followed by a BN, once the BN is folded into the conv before the ReLU
    (`fold_bn_after_relu`). `inplace` when its input is a tensor nothing else reads (a conv's fresh output)."""

    def __init__(self, floor: torch.Tensor, inplace: bool = False):
        super().__init__()
        self.register_buffer('floor', floor.detach().clone().view(-1, 1, 1))
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one vectorized pass, as fast as a ReLU: clamp with both bounds as tensors is several times slower on CPU
        floor = self.floor.to(x.dtype)  # a float32 floor would promote a bf16 x out of place
        return x.clamp_min_(floor) if self.inplace else x.clamp_min(floor)

    def extra_repr(self) -> str:
        return f'{self.floor.numel()}, inplace={self.inplace}'


@torch.no_grad()
def fold_bn_after_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, next_conv: nn.Conv2d) \
        -> Tuple[nn.Conv2d, ClampMin2d, nn.Conv2d]:
    """conv, ReLU, bn, next_conv in eval as conv', `ClampMin2d`, next_conv' (module doc): no norm and no bias
    map left. s = -1 where bn's scale is negative, else 1."""
    a, b = bn_affine(bn)
    sign = torch.where(a < 0, -1.0, 1.0).to(a.dtype)
    w = next_conv.weight
    new_next = _conv_like(next_conv, type(next_conv), w * _per_input(sign.to(w.dtype), next_conv), next_conv.bias)
    return _affine_after_conv(conv, a.abs(), sign * b), ClampMin2d(sign * b).train(conv.training), new_next


@torch.no_grad()
def fold_bn_before_linear(bn: nn.BatchNorm2d, fc: nn.Linear) -> nn.Linear:
    """fc(avgpool(bn(x))) = fc'(avgpool(x)): BN's affine map commutes with a global average pool."""
    a, b = bn_affine(bn)
    w = fc.weight
    new = nn.Linear(fc.in_features, fc.out_features, device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(w * a.to(w.dtype)[None], requires_grad=w.requires_grad)
    bias = w @ b.to(w.dtype) + (fc.bias if fc.bias is not None else 0.0)
    new.bias = nn.Parameter(bias, requires_grad=w.requires_grad)
    return new.train(fc.training)
