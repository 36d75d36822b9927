"""Variance shift (Li et al. 2019) and BatchNorm recalibration, for every norm that keeps running statistics.

Dropout scales a unit's training-time variance by about 1/p_keep (more with a non-zero mean). A BN layer after it
accumulates that inflated variance as `running_var` and keeps dividing by it at test time, when dropout is off.
Per BN layer and channel the shift is `max(real_var / moving_var, moving_var / real_var)`, where real_var is the
variance the layer's input really has at test time: training data through the network in eval mode (dropout off,
BN on its running statistics, weights frozen). 1 means no shift.

Every norm that divides by a running variance at test time is measured and recalibrated the same way: BatchNorm,
and also variance normalization (`VarianceNorm2d`) and EvoNorm-B0 (timm's `EvoNorm2dB0`), whose `running_var` is
the centred variance of their input, like BatchNorm's (`_common.running_stat_norms`).
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import (
    ChannelMoments, autocast_context, bn_layers, check_num_batches, iter_batches, model_device_dtype, preserved,
    running_stat_norms,
)

__all__ = ['LayerShift', 'VarianceShift', 'variance_shift', 'recalibrate_bn']


@dataclass
class LayerShift:
    """Variance shift of one norm layer (BN, VarianceNorm2d, EvoNorm2dB0). `shift` is the mean over channels of the
    per-channel shift."""
    name: str
    num_channels: int
    shift: float
    shift_median: float
    shift_max: float
    real_var: float  # mean over channels of the test-time variance of the layer's input
    moving_var: float  # mean over channels of running_var
    channel_shift: List[float] = field(repr=False)


@dataclass
class VarianceShift:
    """Per-layer variance shift, norm layers in the order the forward pass runs them."""
    layers: List[LayerShift]
    num_batches: int
    num_samples: int
    skipped: List[str]  # BN layers without running statistics (track_running_stats=False), norms that never ran
    measured_on: str = 'training batches'  # which data real_var comes from (diagnose_model says more)

    @property
    def mean_shift(self) -> float:
        """Mean over layers of each layer's (channel-mean) shift."""
        return sum(layer.shift for layer in self.layers) / len(self.layers)

    @property
    def max_shift(self) -> float:
        return max(layer.shift for layer in self.layers)

    @property
    def worst_layer(self) -> str:
        return max(self.layers, key=lambda layer: layer.shift).name

    def summary(self) -> Dict[str, Any]:
        return dict(mean_shift=self.mean_shift, max_shift=self.max_shift, worst_layer=self.worst_layer,
                    num_layers=len(self.layers), num_batches=self.num_batches, num_samples=self.num_samples,
                    skipped=list(self.skipped), measured_on=self.measured_on)

    def to_dict(self) -> Dict[str, Any]:
        return dict(summary=self.summary(), layers=[asdict(layer) for layer in self.layers])


def _tracked_norms(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    layers = running_stat_norms(model)
    if not layers:
        if bn_layers(model):
            raise ValueError('no BatchNorm layer tracks running statistics (all have track_running_stats=False): '
                             'they normalise with batch statistics at test time too, so there is no shift to measure')
        raise ValueError(
            f'{type(model).__name__} has no BatchNorm layer, nor another norm with running statistics '
            '(VarianceNorm2d, EvoNorm2dB0): variance shift and recalibration apply only to norms that normalise '
            'with running statistics at test time')
    return layers


@torch.no_grad()
def variance_shift(
        model: nn.Module,
        loader: Iterable,
        num_batches: int = 8,
        autocast: bool = False,
) -> VarianceShift:
    """Measure the variance shift of every norm with running statistics on up to `num_batches` training batches.

    The whole model runs in eval mode (dropout off, norms on running statistics) under `torch.no_grad`; hooks,
    train/eval flags and all parameters and buffers are left as they were.
    """
    check_num_batches(num_batches)
    tracked = {m: name for name, m in _tracked_norms(model)}
    skipped = [name for name, m in bn_layers(model) if m not in tracked]
    moments: Dict[nn.Module, ChannelMoments] = {}  # insertion order = order of execution
    device, dtype = model_device_dtype(model)
    num_samples = batches = 0

    def record_input(module: nn.Module, args: tuple) -> None:
        moments.setdefault(module, ChannelMoments()).update(args[0])

    with preserved(model) as handles:
        model.eval()
        handles.extend(m.register_forward_pre_hook(record_input) for m in tracked)
        for inputs, _ in iter_batches(loader, num_batches, device, dtype):
            with autocast_context(device, autocast):
                model(inputs)
            num_samples += inputs.shape[0]
            batches += 1

    if not moments:
        raise RuntimeError('no norm layer ran in the forward pass: check that the loader feeds this model')
    results = []
    for m, mom in moments.items():
        # the norm divides by sqrt(var + eps): the shift its output sees is between the eps-padded variances
        real = mom.var() + m.eps
        moving = m.running_var.detach().double().to(real.device) + m.eps
        ratio = real / moving
        per_channel = torch.maximum(ratio, 1.0 / ratio)
        results.append(LayerShift(
            name=tracked[m], num_channels=per_channel.numel(), shift=per_channel.mean().item(),
            shift_median=per_channel.median().item(), shift_max=per_channel.max().item(),
            real_var=(real - m.eps).mean().item(), moving_var=(moving - m.eps).mean().item(),
            channel_shift=per_channel.tolist()))
    never_run = [name for m, name in tracked.items() if m not in moments]
    return VarianceShift(layers=results, num_batches=batches, num_samples=num_samples, skipped=skipped + never_run)


@torch.no_grad()
def recalibrate_bn(
        model: nn.Module,
        loader: Iterable,
        num_batches: int = 8,
        train_mode: bool = False,
        autocast: bool = False,
) -> nn.Module:
    """Re-estimate the running statistics of every norm that keeps them, in place, on up to `num_batches`
    batches; returns `model`.

    Each norm restarts its statistics and takes the cumulative average of the batches (BatchNorm's
    `momentum=None`; for VarianceNorm2d and EvoNorm2dB0 a momentum of 1/calls set before each call, which is the
    same average), with its original momentum restored afterwards. Only those norms' buffers change: no parameter,
    no other buffer.

    `train_mode=False` (Li et al.'s remedy) runs only the norms in train mode; dropout, drop-path and every
    other module run as at test time, so the new statistics are the test-time ones. `train_mode=True` runs the
    whole model in train mode, dropout on, which reproduces the statistics training itself accumulates (e.g. to
    give an untrained model realistic running statistics).
    """
    check_num_batches(num_batches)
    norms = [m for _, m in _tracked_norms(model)]
    momenta = {m: m.momentum for m in norms}
    calls: Dict[nn.Module, int] = {}

    def cumulative_momentum(module: nn.Module, args: tuple) -> None:
        calls[module] = calls.get(module, 0) + 1
        module.momentum = 1.0 / calls[module]

    device, dtype = model_device_dtype(model)
    with preserved(model) as handles:
        for m in norms:
            if isinstance(m, _BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over the batches seen
            else:
                for buf_name, buf in m.named_buffers(recurse=False):
                    if buf_name == 'running_var':
                        buf.fill_(1.0)
                    elif buf_name == 'running_mean':
                        buf.zero_()
                handles.append(m.register_forward_pre_hook(cumulative_momentum))
        try:
            # Not torch.optim.swa_utils.update_bn: it calls model.train(), which turns dropout (and drop-path)
            # on, so the statistics would carry dropout's variance again; it also restores only the top-level
            # train/eval flag, and knows only BatchNorm. Here only the norms are in train mode (all modules with
            # train_mode=True).
            for m in model.modules():
                m.training = train_mode or m in momenta
            for inputs, _ in iter_batches(loader, num_batches, device, dtype):
                with autocast_context(device, autocast):
                    model(inputs)
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
    return model
