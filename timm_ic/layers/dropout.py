"""Dropout kinds and the IC layer.

- Uout (Li et al. 2019): multiplicative uniform noise, x + x * r with r ~ U(-beta, beta) per element.
  Its train/test variance shift is 3 / (3 + beta^2) for zero-mean input, against p_keep for Bernoulli dropout.
- IC layer (Chen et al. 2019): a normalizer followed by a dropout, placed right before a weight layer.
  BN centres the units so that dropout's gates scale pairwise correlation by p_keep.
"""
from typing import Optional

import torch
import torch.nn as nn

from .norm import create_norm

__all__ = ['Uout', 'ICLayer', 'create_dropout', 'DROP_KINDS']

DROP_KINDS = ('dropout', 'uout', 'none')


def check_drop_rate(drop_rate: float) -> float:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f'drop_rate must be in [0, 1) (the probability of zeroing a unit), got {drop_rate}')
    return float(drop_rate)


def check_beta(beta: float) -> float:
    if not beta >= 0.0:
        raise ValueError(f'Uout beta must be >= 0 (noise r ~ U(-beta, beta)), got {beta}')
    return float(beta)


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
        # x + x * r with r ~ U(-beta, beta), as one multiply: 1 + r ~ U(1 - beta, 1 + beta)
        return x * torch.empty_like(x).uniform_(1.0 - self.beta, 1.0 + self.beta)

    def extra_repr(self) -> str:
        return f'beta={self.beta}'


def create_dropout(kind: str = 'dropout', drop_rate: float = 0.0, beta: float = 0.0) -> nn.Module:
    """A dropout module by kind: 'dropout' (Bernoulli, `drop_rate`), 'uout' (`beta`) or 'none'."""
    if kind not in DROP_KINDS:
        raise ValueError(f'unknown dropout kind {kind!r}; valid: {list(DROP_KINDS)}')
    drop_rate, beta = check_drop_rate(drop_rate), check_beta(beta)
    if kind == 'dropout' and drop_rate > 0.0:
        return nn.Dropout(drop_rate)
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
