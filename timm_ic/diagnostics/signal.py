"""Signal propagation (Lubana et al. 2021): how activations and gradients behave across depth.

Probed at two kinds of points, each labelled in the results (`LayerSignal.probe`): the output of every weight
layer (conv by default), and the output of every block (in a ResNet the residual stream, which grows with depth
while each conv output can stay flat). Blocks are found from timm's `group_matcher()`, the modules its
fine-grained `blocks` pattern names (`stages.0.1`, `layer1.0`, ...). At each point:
- activation variance `x.var(dim=(0, 2, 3)).mean()` (per-channel variance over the batch and positions, averaged);
- mean cosine similarity between samples: normalise each flattened sample, Gram G, mean_i (sum_j G_ij - 1)/(N-1);
  near 1 means the network maps every input to nearly the same direction;
- stable rank tr(G) / ||G||_2 of that Gram matrix (between 1 and N: how many directions the batch spans);
- gradient norm ||dL/d(output)|| of the batch's mean loss, from one backward pass per batch.
"""
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import autocast_context, check_num_batches, iter_batches, model_device_dtype, preserved

__all__ = ['LayerSignal', 'SignalPropagation', 'signal_propagation', 'activation_variance',
           'sample_cosine_similarity', 'stable_rank', 'block_names', 'LAYER_PROBE', 'BLOCK_PROBE']

LAYER_PROBE = 'layer output'
BLOCK_PROBE = 'block output'  # the residual stream in a ResNet


def activation_variance(x: torch.Tensor) -> float:
    """Per-channel variance over every dim but the channel dim (1), averaged over channels."""
    dims = [d for d in range(x.ndim) if d != 1]
    return x.float().var(dim=dims).mean().item()


def _normalised_gram(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().flatten(1).double()
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return flat @ flat.t()


def sample_cosine_similarity(x: torch.Tensor) -> float:
    """Mean cosine similarity between distinct samples of a batch (N >= 2); NaN for an all-zero (dead) output."""
    n = x.shape[0]
    if n < 2:
        raise ValueError('cosine similarity between samples needs a batch of at least 2')
    if not x.detach().any():
        return float('nan')
    gram = _normalised_gram(x)
    return ((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item()


def stable_rank(x: torch.Tensor) -> float:
    """tr(G) / ||G||_2 of the samples' normalised Gram matrix G."""
    gram = _normalised_gram(x)
    return (gram.diagonal().sum() / torch.linalg.eigvalsh(gram)[-1]).item()


def block_names(model: nn.Module) -> List[str]:
    """Names of the model's blocks: the modules that timm's `group_matcher(coarse=False)` calls blocks
    (e.g. `stages.0.1`, `layer1.0`), leaves excluded; [] for a model without a group matcher."""
    matcher = getattr(model, 'group_matcher', None)
    if matcher is None:
        return []
    try:
        spec = matcher(coarse=False).get('blocks')
    except (NotImplementedError, TypeError, AttributeError):
        return []
    if spec is None:
        return []
    # a pattern, or a list of (pattern, ordinal) pairs as timm's models give it
    patterns = [spec] if isinstance(spec, str) else [p[0] if isinstance(p, (list, tuple)) else p for p in spec]
    return [name for name, m in model.named_modules()
            if name and any(re.fullmatch(p, name) for p in patterns) and next(m.children(), None) is not None]


@dataclass
class LayerSignal:
    name: str
    module: str  # class name
    probe: str  # where: LAYER_PROBE (a weight layer's output) or BLOCK_PROBE (a block's output, residual stream)
    activation_variance: float
    cosine_similarity: float
    stable_rank: float
    grad_norm: float


@dataclass
class SignalPropagation:
    """Per-layer signal statistics averaged over batches, probe points in the order the forward pass runs them
    (a block after the layers inside it)."""
    layers: List[LayerSignal]
    num_batches: int
    mode: str
    loss: float

    def at(self, probe: str) -> List[LayerSignal]:
        """The probe points of one kind: LAYER_PROBE or BLOCK_PROBE."""
        return [layer for layer in self.layers if layer.probe == probe]

    def to_dict(self) -> Dict[str, Any]:
        return dict(num_batches=self.num_batches, mode=self.mode, loss=self.loss,
                    layers=[asdict(layer) for layer in self.layers])


def signal_propagation(
        model: nn.Module,
        loader: Iterable,
        num_batches: int = 1,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        layer_types: Tuple[type, ...] = (nn.modules.conv._ConvNd,),
        mode: str = 'train',
        autocast: bool = False,
        blocks: Union[str, Sequence[str], None] = 'auto',
) -> SignalPropagation:
    """Measure activation variance, sample similarity, stable rank and gradient norm at each layer's output
    and each block's output.

    `blocks`: 'auto' for `block_names(model)`, a list of module names, or None for weight layers only.

    `mode='train'` runs the model as the optimizer sees it (BN on batch statistics, dropout on; BN running
    statistics are restored afterwards); `mode='eval'` as at test time. Gradients come from
    `torch.autograd.grad` on the layer outputs, so no parameter's `.grad` is touched. The loader must yield
    (inputs, targets) for `loss_fn(model(inputs), targets)`.
    """
    if mode not in ('train', 'eval'):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    check_num_batches(num_batches)
    names = {m: name for name, m in model.named_modules() if isinstance(m, layer_types)}
    if not names:
        raise ValueError(f'{type(model).__name__} has no layer of type {[t.__name__ for t in layer_types]}; '
                         'pass layer_types=(nn.Linear,) or others that the model has')
    named = dict(model.named_modules())
    block_list = block_names(model) if blocks == 'auto' else list(blocks or [])
    missing = [b for b in block_list if b not in named]
    if missing:
        raise ValueError(f'blocks {missing} are not modules of {type(model).__name__}')
    probes = {m: LAYER_PROBE for m in names}
    for b in block_list:
        names.setdefault(named[b], b)
        probes.setdefault(named[b], BLOCK_PROBE)
    device, dtype = model_device_dtype(model)
    outputs: List[Tuple[str, nn.Module, torch.Tensor]] = []
    sums: Dict[str, List[float]] = {}
    kinds: Dict[str, Tuple[str, str]] = {}
    losses: List[float] = []

    def keep_output(module, args, output):
        if not isinstance(output, torch.Tensor):
            return None
        calls = sum(1 for _, m, _ in outputs if m is module)
        key = names[module] if calls == 0 else f'{names[module]}#{calls + 1}'  # a module run twice
        outputs.append((key, module, output))
        # downstream in-place ops (x += shortcut, ReLU(inplace=True)) then modify the clone, and autograd.grad
        # w.r.t. `output` is still the gradient at this layer's output
        return output.clone()

    with preserved(model, norm_buffers=mode == 'train') as handles, torch.enable_grad():
        model.train(mode == 'train')
        handles.extend(m.register_forward_hook(keep_output) for m in names)
        batches = 0
        for inputs, targets in iter_batches(loader, num_batches, device, dtype):
            if targets is None:
                raise ValueError('signal propagation needs targets for the gradient: the loader must yield '
                                 '(inputs, targets)')
            outputs.clear()
            # the input requires grad so a graph exists even when every parameter is frozen
            inputs = inputs.detach().requires_grad_(inputs.is_floating_point())
            with autocast_context(device, autocast):
                logits = model(inputs)
                if not isinstance(logits, torch.Tensor):
                    raise TypeError(f'the model returned {type(logits).__name__}, not a tensor of logits: '
                                    'use a classification model (not features_only)')
                loss = loss_fn(logits.float(), targets)
            taps = [out for _, _, out in outputs]
            grads = torch.autograd.grad(loss, taps, allow_unused=True)
            for (key, module, out), grad in zip(outputs, grads):
                kinds[key] = (type(module).__name__, probes[module])
                values = [activation_variance(out.detach()), sample_cosine_similarity(out),
                          stable_rank(out), grad.float().norm().item() if grad is not None else float('nan')]
                acc = sums.setdefault(key, [0.0] * 4)
                for i, v in enumerate(values):
                    acc[i] += v
            losses.append(loss.item())
            outputs.clear()
            batches += 1
    layers = [LayerSignal(key, *kinds[key], *(v / batches for v in acc)) for key, acc in sums.items()]
    return SignalPropagation(layers=layers, num_batches=batches, mode=mode, loss=sum(losses) / batches)
