"""Model statistics for the model card: parameters, MACs and activations of one image, as timm's cards give them."""
from typing import Dict, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['count_model_stats']


class _ActivationCounter(TorchDispatchMode):
    """Counts output elements of convolutions and matrix products: fvcore's activation count, which timm's
    own cards report as 'Activations (M)'."""
    _OPS = ('convolution', 'mm', 'addmm', 'bmm', 'baddbmm', 'matmul', 'linear', '_scaled_dot_product')

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if any(name.startswith(op) for op in self._OPS) and isinstance(out, torch.Tensor):
            self.count += out.numel()
        return out


@torch.no_grad()
def count_model_stats(model: torch.nn.Module, input_size: Sequence[int]) -> Dict[str, float]:
    """Params (M), GMACs and Activations (M) of one `input_size` (C, H, W) image, in eval mode.

    MACs are half of `torch.utils.flop_counter.FlopCounterMode`'s FLOPs (it counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros((1, *input_size), dtype=param.dtype, device=param.device)
        counter = FlopCounterMode(display=False)
        activations = _ActivationCounter()
        with counter, activations:
            model(x)
    finally:
        model.train(was_training)
    return {
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'gmacs': counter.get_total_flops() / 2 / 1e9,
        'activations_m': activations.count / 1e6,
    }
