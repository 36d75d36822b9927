"""Shared plumbing of the diagnostics: finding layers, feeding batches, leaving the model as it was."""
import contextlib
import itertools
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.hooks import RemovableHandle


def dropout_types() -> Tuple[type, ...]:
    """The dropout module classes: torch's (`nn.Dropout`, `Dropout2d`, ...) and timm_ic's `Uout`."""
    try:  # imported here so the diagnostics work on any timm model even without timm_ic.layers
        from timm_ic.layers import Uout
    except ImportError:
        return (_DropoutNd,)
    return (_DropoutNd, Uout)


def is_dropout(module: nn.Module) -> bool:
    return isinstance(module, dropout_types())


def is_active_dropout(module: nn.Module) -> bool:
    """A dropout that changes its input in train mode (p > 0, or Uout's beta > 0)."""
    if isinstance(module, _DropoutNd):
        return module.p > 0.0
    return is_dropout(module) and getattr(module, 'beta', 0.0) > 0.0


def bn_layers(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """(name, module) of every BatchNorm layer: any `_BatchNorm` (BatchNorm1d/2d/3d, SyncBatchNorm, timm's
    BatchNormAct2d)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def tracks_running_stats(module: nn.Module) -> bool:
    """A norm that normalises with running statistics at test time: a BatchNorm with `track_running_stats`, or any
    other module with a `running_var` buffer and a `momentum` (timm_ic's VarianceNorm2d, timm's EvoNorm2dB0/B1/B2;
    the EvoNorm-Bs use it only with their activation on, `apply_act`)."""
    if isinstance(module, _BatchNorm):
        return module.running_var is not None
    return (isinstance(getattr(module, 'running_var', None), torch.Tensor) and hasattr(module, 'momentum')
            and getattr(module, 'apply_act', True) is not False)


def running_stat_norms(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every norm that keeps running statistics (`tracks_running_stats`), in module order.

    These are the layers that dropout's train-time variance can shift (Li et al.), and that recalibration
    re-estimates: not only BatchNorm but also variance normalization and EvoNorm-B0 (Lubana et al.'s zoo).
    """
    return [(name, m) for name, m in model.named_modules() if tracks_running_stats(m)]


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (or buffer); CPU/float32 for an empty model."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device('cpu'), torch.float32


def check_num_batches(num_batches: int) -> int:
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f'num_batches must be a positive int (it bounds how much data is read), got {num_batches!r}')
    return num_batches


def iter_batches(
        loader: Iterable, num_batches: int, device: torch.device, dtype: torch.dtype,
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(inputs, targets or None) of the first `num_batches` batches, moved to the model's device and dtype.

    A batch is a tensor or a tuple/list whose first element is the input tensor (and second the targets),
    the convention of torch's `swa_utils.update_bn` and of timm's loaders.
    """
    check_num_batches(num_batches)
    seen = 0
    for batch in itertools.islice(loader, num_batches):
        if isinstance(batch, (list, tuple)):
            inputs, targets = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            inputs, targets = batch, None
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(
                f'a batch must be a tensor or a (inputs, targets) tuple of tensors, got {type(inputs).__name__}: '
                'give a DataLoader over a dataset whose transform ends in ToTensor')
        inputs = inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else None, non_blocking=True)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(device, non_blocking=True)
        seen += 1
        yield inputs, targets
    if seen == 0:
        raise ValueError('the loader yielded no batch: give it a non-empty dataset '
                         '(and drop_last=False if it is small)')


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device when enabled (statistics are still accumulated in float64)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def preserved(model: nn.Module, norm_buffers: bool = False) -> Iterator[List[RemovableHandle]]:
    """Restore every module's train/eval flag on exit and remove the hook handles appended to the yielded list.

    With `norm_buffers`, the buffers of every norm that keeps running statistics (`running_stat_norms`) are also
    restored (for passes that run the norms in train mode, which updates them).
    """
    training: Dict[nn.Module, bool] = {m: m.training for m in model.modules()}
    saved: Dict[str, torch.Tensor] = {}
    if norm_buffers:
        for name, m in running_stat_norms(model):
            for buf_name, buf in m.named_buffers(recurse=False):
                if buf is not None:
                    saved[f'{name}.{buf_name}'] = buf.detach().clone()
    handles: List[RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
        if saved:
            buffers = dict(model.named_buffers())
            with torch.no_grad():
                for key, value in saved.items():
                    buffers[key].copy_(value)


class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations over all other dims, merged batch by batch.

    Float64 and Chan et al.'s pairwise merge, so many batches of low-precision (bf16) activations add up exactly.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        n = flat.shape[1]
        if n == 0:
            return
        b_mean = flat.mean(dim=1)
        b_m2 = (flat - b_mean[:, None]).square().sum(dim=1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, b_mean, b_m2
            return
        total = self.count + n
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + b_m2 + delta.square() * (self.count * n / total)
        self.count = total

    def var(self) -> torch.Tensor:
        """Unbiased per-channel variance, as BatchNorm's running_var estimates it."""
        return self.m2 / max(self.count - 1, 1)
