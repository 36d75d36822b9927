"""Correlation and mutual information between units, before and after a dropout (Chen et al. 2019).

With independent keep gates (probability p_keep), dropout scales the mutual information between two units by
p_keep^2 and their correlation by p_keep, each under its own condition on the input:

- correlation x p_keep needs zero-mean units (why the IC layer puts BN first). For a non-zero mean it shrinks
  more: with E[y^2] scaled by k (k = 1/p_keep for dropout, 1 + beta^2/3 for Uout) the variance becomes
  k*(v + mu^2) - mu^2 while the covariance is unchanged, so rho_ij scales by sqrt(v_i v_j / (v'_i v'_j)). This
  mean-aware prediction holds for any input and is reported everywhere; x p_keep only where the input is
  zero-mean: mean over units of |mu|/sigma at most `ZERO_MEAN_TOL` (a unit at |mu|/sigma = 0.1 has x p_keep
  within (1 - p_keep) * 0.1^2 <= 1% of its mean-aware ratio).
- MI x p_keep^2 needs an input with no mass at 0 (a BN or conv output): then y = 0 exactly when the gate
  dropped the unit, and I(y_i; y_j) = p_keep^2 I(x_i; x_j). After a ReLU about half the inputs are exactly 0
  and a zero output no longer tells a dropped unit from a kept one, so the MI falls further (on the digits,
  conv-ReLU-dropout measures 0.17 for p_keep 0.5, 0.72 for 0.9). Predicted only where at most `NO_ATOM_TOL`
  of the input values are exactly 0; Uout has no closed form.

Units are channels; the samples of a unit are all its values over images and spatial positions. Each result
records the measured conditions (`input_abs_mean_over_std`, `input_zero_fraction`, `zero_mean`,
`no_atom_at_zero`); a prediction whose condition fails is None.
"""
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.dropout import _DropoutNd

from ._common import (
    autocast_context, bn_layers, check_num_batches, is_active_dropout, is_dropout, iter_batches, model_device_dtype,
    preserved,
)

__all__ = ['CorrelationResult', 'correlation_reduction', 'mean_abs_correlation', 'mutual_information',
           'second_moment_factor', 'ZERO_MEAN_TOL', 'NO_ATOM_TOL']

# the input counts as zero-mean when the mean over units of |mu| / sigma is at most this (see the module docstring)
ZERO_MEAN_TOL = 0.1
# the input counts as having no atom at 0 when at most this fraction of its values is exactly 0
NO_ATOM_TOL = 0.01


@dataclass
class CorrelationResult:
    """Mean |correlation| and mean mutual information (nats) between a dropout's input units and output units."""
    layer: str
    drop: str  # module class name: Dropout, Uout, ...
    p_keep: Optional[float]  # None for Uout
    beta: Optional[float]  # Uout's noise half-width, None for Bernoulli dropout
    follows_bn: bool  # the dropout's input is a BatchNorm's output (an IC layer)
    num_units: int
    num_samples: int
    input_abs_mean_over_std: float  # mean over units of |mu| / sigma: 0 for perfectly centred units
    input_zero_fraction: float  # fraction of the input values that are exactly 0 (about 0.5 after a ReLU)
    zero_mean: bool  # input_abs_mean_over_std <= ZERO_MEAN_TOL: the condition of correlation x p_keep
    no_atom_at_zero: bool  # input_zero_fraction <= NO_ATOM_TOL: the condition of MI x p_keep^2
    corr_before: float
    corr_after: float
    # mean |r| of independent units from num_samples samples, sqrt(2 / (pi * num_samples)): a corr_before near it
    # is sampling noise, which dropout does not shrink (e.g. a head dropout on a few pooled feature vectors)
    corr_noise_floor: float
    corr_ratio: float
    # p_keep (dropout), 3/(3+beta^2) (Uout): the prediction for zero-mean units; None where the input is not
    corr_ratio_zero_mean: Optional[float]
    corr_ratio_expected: float  # theory with the measured means: holds for any input
    mi_units: int
    mi_samples: int
    mi_before: Optional[float]
    mi_after: Optional[float]
    mi_ratio: Optional[float]
    # p_keep^2 for dropout on an input without an atom at 0; None otherwise (and for Uout: no closed form)
    mi_ratio_expected: Optional[float]
    # mi_* are None when fewer than `min_mi_samples` samples were seen (e.g. a head dropout on pooled features):
    # the plug-in estimate over (n_bins+1)^2 cells is then mostly bias

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def second_moment_factor(module: nn.Module) -> float:
    """k with E[y^2] = k * E[x^2] for the module in train mode: 1/p_keep for dropout, 1 + beta^2/3 for Uout."""
    if isinstance(module, _DropoutNd):
        return 1.0 / (1.0 - module.p)
    beta = getattr(module, 'beta', None)
    if beta is None:
        raise TypeError(f'{type(module).__name__} is neither a torch dropout nor Uout')
    return 1.0 + beta * beta / 3.0


def _as_units(x: torch.Tensor) -> torch.Tensor:
    """(samples, units): channels are units; images and positions are samples."""
    if x.ndim < 2:
        raise ValueError(f'need activations with a channel dim (N, C, ...), got shape {tuple(x.shape)}')
    if x.ndim == 2:
        return x
    return x.transpose(0, 1).reshape(x.shape[1], -1).t()


class _CrossMoments:
    """Streaming float64 sums for the mean and covariance matrix of the units."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: Optional[torch.Tensor] = None
        self.s2: Optional[torch.Tensor] = None

    def update(self, units: torch.Tensor) -> None:
        u = units.double()
        if self.s1 is None:
            self.s1 = torch.zeros(u.shape[1], dtype=torch.float64, device=u.device)
            self.s2 = torch.zeros(u.shape[1], u.shape[1], dtype=torch.float64, device=u.device)
        self.n += u.shape[0]
        self.s1 += u.sum(dim=0)
        self.s2 += u.t() @ u

    def mean_cov(self):
        mean = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(mean, mean)) / max(self.n - 1, 1)
        return mean, cov


def _pair_mask(c: int, device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(c, c, dtype=torch.bool, device=device), diagonal=1)


def _correlation(cov: torch.Tensor) -> torch.Tensor:
    std = cov.diagonal().clamp_min(0).sqrt()
    return cov / torch.outer(std, std)  # nan for dead (constant) units, dropped by nanmean


def mean_abs_correlation(units: torch.Tensor) -> float:
    """Mean over unit pairs of |Pearson correlation|; `units` is (samples, units). Constant units are ignored."""
    moments = _CrossMoments()
    moments.update(units)
    corr = _correlation(moments.mean_cov()[1])
    return corr[_pair_mask(corr.shape[0], corr.device)].abs().nanmean().item()


def _quantize(units: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Codes 0..n_bins: exact zeros (what dropout's gates produce) get code 0, other values n_bins equal-mass bins."""
    codes = torch.zeros(units.shape, dtype=torch.long, device=units.device)
    probs = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=units.device)[1:-1]
    for j in range(units.shape[1]):
        col = units[:, j].double()
        nonzero = col != 0
        if nonzero.any():
            edges = torch.quantile(col[nonzero], probs)
            codes[nonzero, j] = 1 + torch.bucketize(col[nonzero], edges)
    return codes


def mutual_information(units: torch.Tensor, n_bins: int = 8) -> float:
    """Mean over unit pairs of a plug-in mutual information estimate (nats) with Miller-Madow bias correction.

    `units` is (samples, units). Each unit is quantized into `n_bins` equal-mass bins plus one bin for exact zeros,
    so that a dropped unit (zero) is told apart from a kept one, which is what the p_keep^2 law is about.
    """
    m, c = units.shape
    if c < 2 or m < 2:
        raise ValueError(f'need at least 2 samples of 2 units, got shape {tuple(units.shape)}')
    symbols = n_bins + 1
    codes = _quantize(units, n_bins)
    # every pair's joint histogram at once: one-hot codes (m, c*symbols), then their Gram matrix of counts
    # (float32 counts are exact below 2^24 samples)
    one_hot = torch.nn.functional.one_hot(codes, symbols).reshape(m, c * symbols).float()
    counts = (one_hot.t() @ one_hot).view(c, symbols, c, symbols).permute(0, 2, 1, 3)
    i, j = torch.triu_indices(c, c, offset=1, device=units.device)
    joint = counts[i, j].double() / m
    pa, pb = joint.sum(dim=2), joint.sum(dim=1)
    terms = joint * (joint.log() - pa[:, :, None].log() - pb[:, None, :].log())
    mi = torch.nan_to_num(terms, nan=0.0).sum(dim=(1, 2))
    # Miller-Madow: the plug-in estimate is biased up by about (K_ab - K_a - K_b + 1) / (2m) nats
    occupied = lambda p: (p > 0).sum(dim=tuple(range(1, p.ndim))).double()  # noqa: E731
    mi = mi - (occupied(joint) - occupied(pa) - occupied(pb) + 1) / (2 * m)
    return mi.mean().item()


def _expected_ratio(mean: torch.Tensor, cov: torch.Tensor, k: float) -> float:
    var = cov.diagonal()
    var_after = k * (var + mean.square()) - mean.square()
    scale = torch.sqrt(torch.outer(var, var) / torch.outer(var_after, var_after))
    corr = _correlation(cov).abs()
    mask = _pair_mask(cov.shape[0], cov.device) & ~corr.isnan()
    return ((corr * scale)[mask].sum() / corr[mask].sum()).item()


@torch.no_grad()
def correlation_reduction(
        model: nn.Module,
        loader: Iterable,
        layers: Optional[Sequence[str]] = None,
        num_batches: int = 4,
        max_units: int = 32,
        max_samples: int = 16384,
        n_bins: int = 8,
        min_mi_samples: int = 2048,
        autocast: bool = False,
        seed: int = 0,
) -> List[CorrelationResult]:
    """Measure correlation and mutual information across each dropout layer (input vs output) on real batches.

    `layers`: dropout module names; default every dropout that is active (p > 0, Uout beta > 0). The model runs
    as in training (train mode, dropout on) under `torch.no_grad`; BN running statistics, hooks and train/eval
    flags are restored afterwards. Correlation uses every unit and sample; the mutual information, which costs
    more, uses `max_units` evenly spaced units and up to `max_samples` samples, and is left out (None) below
    `min_mi_samples`.
    """
    check_num_batches(num_batches)
    named = dict(model.named_modules())
    if layers is None:
        chosen = {m: name for name, m in named.items() if is_active_dropout(m)}
        if not chosen:
            raise ValueError(f'{type(model).__name__} has no active dropout layer (nn.Dropout with p > 0 or Uout '
                             'with beta > 0): build it with a placement that has dropout, e.g. placement="ic"')
    else:
        chosen = {}
        for name in layers:
            if name not in named or not is_dropout(named[name]):
                available = [n for n, m in named.items() if is_dropout(m)]
                raise ValueError(f'{name!r} is not a dropout layer of the model; dropout layers: {available}')
            chosen[named[name]] = name
    device, dtype = model_device_dtype(model)
    generator = torch.Generator(device='cpu').manual_seed(seed)
    rows_per_call = max(1, math.ceil(max_samples / num_batches))
    before_in: Dict[nn.Module, torch.Tensor] = {}
    moments = {m: (_CrossMoments(), _CrossMoments()) for m in chosen}
    mi_rows = {m: ([], []) for m in chosen}
    zeros = {m: [0, 0] for m in chosen}  # exact zeros among the input values, values seen
    after_bn: Dict[nn.Module, bool] = {}
    bn_outputs = set()

    def remember_bn_output(module, args, output):
        if isinstance(output, torch.Tensor):
            bn_outputs.add((output.data_ptr(), tuple(output.shape)))

    def take_input(module, args):
        x = args[0]
        after_bn[module] = after_bn.get(module, True) and (x.data_ptr(), tuple(x.shape)) in bn_outputs
        before_in[module] = x.detach().float().clone()  # clone: an inplace dropout overwrites its input

    def compare(module, args, output):
        before, after = _as_units(before_in.pop(module)), _as_units(output.detach().float())
        moments[module][0].update(before)
        zeros[module][0] += int((before == 0).sum())
        zeros[module][1] += before.numel()
        moments[module][1].update(after)
        c = before.shape[1]
        cols = torch.linspace(0, c - 1, min(c, max_units)).round().long().unique().to(before.device)
        rows = torch.randperm(before.shape[0], generator=generator)[:rows_per_call].to(before.device)
        mi_rows[module][0].append(before[rows][:, cols].cpu())
        mi_rows[module][1].append(after[rows][:, cols].cpu())

    with preserved(model, norm_buffers=True) as handles:
        model.train()
        for _, bn in bn_layers(model):
            handles.append(bn.register_forward_hook(remember_bn_output))
        for m in chosen:
            handles.append(m.register_forward_pre_hook(take_input))
            handles.append(m.register_forward_hook(compare))
        for inputs, _ in iter_batches(loader, num_batches, device, dtype):
            bn_outputs.clear()
            with autocast_context(device, autocast):
                model(inputs)

    results = []
    for m, name in chosen.items():
        if moments[m][0].s1 is None:
            raise RuntimeError(f'dropout layer {name!r} did not run in the forward pass')
        mean, cov = moments[m][0].mean_cov()
        _, cov_after = moments[m][1].mean_cov()
        mask = _pair_mask(cov.shape[0], cov.device)
        corr_before = _correlation(cov)[mask].abs().nanmean().item()
        corr_after = _correlation(cov_after)[mask].abs().nanmean().item()
        k = second_moment_factor(m)
        mi_b, mi_a = torch.cat(mi_rows[m][0]), torch.cat(mi_rows[m][1])
        mi_before = mi_after = mi_ratio = None
        if mi_b.shape[0] >= min_mi_samples and mi_b.shape[1] >= 2:
            mi_before, mi_after = mutual_information(mi_b, n_bins), mutual_information(mi_a, n_bins)
            mi_ratio = mi_after / mi_before if mi_before > 0 else float('nan')
        p_keep = 1.0 - m.p if isinstance(m, _DropoutNd) else None
        std = cov.diagonal().sqrt()
        abs_mean_over_std = (mean.abs() / std)[std > 0].mean().item()
        zero_fraction = zeros[m][0] / max(zeros[m][1], 1)
        zero_mean, no_atom = abs_mean_over_std <= ZERO_MEAN_TOL, zero_fraction <= NO_ATOM_TOL
        results.append(CorrelationResult(
            layer=name, drop=type(m).__name__, p_keep=p_keep, beta=getattr(m, 'beta', None),
            follows_bn=after_bn.get(m, False), num_units=cov.shape[0], num_samples=moments[m][0].n,
            input_abs_mean_over_std=abs_mean_over_std, input_zero_fraction=zero_fraction,
            zero_mean=zero_mean, no_atom_at_zero=no_atom,
            corr_before=corr_before, corr_after=corr_after,
            corr_noise_floor=math.sqrt(2 / (math.pi * moments[m][0].n)), corr_ratio=corr_after / corr_before,
            corr_ratio_zero_mean=1.0 / k if zero_mean else None, corr_ratio_expected=_expected_ratio(mean, cov, k),
            mi_units=mi_b.shape[1], mi_samples=mi_b.shape[0], mi_before=mi_before, mi_after=mi_after,
            mi_ratio=mi_ratio,
            mi_ratio_expected=p_keep ** 2 if p_keep is not None and no_atom else None))
    return results
