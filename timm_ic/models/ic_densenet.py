"""DenseNets with paper placements: DenseNet-BC for CIFAR and timm's ImageNet DenseNet-121, Uout variants.

DenseNet-BC (Huang et al.), L=100, k=12: 3x3 stem conv of 2k channels, three dense blocks of (L-4)/6
bottleneck layers (1x1 conv to 4k, 3x3 conv to k), transitions that halve the channels (compression 0.5)
then average-pool. The baseline `cifar_densenet_bc100` is DenseNet's own BN-ReLU-conv (`pre`).
Uout variants put Uout before every conv after the stem, where Li et al. 2019 study dropout in DenseNet's
bottlenecks, at beta 0.2: the one Uout setting Li et al. report an accuracy result for (CIFAR-100, DenseNet
and WRN). Using it on ImageNet (`uout_densenet121`) is our choice.
"""
from functools import partial

import torch.nn as nn
from timm.models import generate_default_cfgs

from ..placement import Placement
from ._registry import register_model
from .ic_resnet import _cifar_cfg, _imagenet_cfg
from .placed import DenseLayerSpec, PlacedNet, Skeleton, TransitionSpec, conv_layer, create_placed_model
from .skeleton import extract_skeleton
from .tags import add_pretrained_tags

__all__ = ['densenet_bc_skeleton', 'timm_densenet_skeleton']

UOUT = str(Placement.preset('pre', drop='uout', beta=0.2))


def densenet_bc_skeleton(
        depth: int = 100,
        growth_rate: int = 12,
        compression: float = 0.5,
        bn_size: int = 4,
        in_chans: int = 3,
) -> Skeleton:
    """DenseNet-BC weight layers for 32x32 input; stage i > 0 opens with the transition into it."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f'DenseNet-BC depth must be 6n+4, got {depth}')
    n = (depth - 4) // 6
    channels = 2 * growth_rate
    stem = conv_layer(in_chans, channels)
    stages = []
    for si in range(3):
        specs = []
        if si > 0:
            out_chs = int(channels * compression)
            specs.append(TransitionSpec(conv_layer(channels, out_chs, 1), nn.AvgPool2d(2)))
            channels = out_chs
        for _ in range(n):
            mid = bn_size * growth_rate
            specs.append(DenseLayerSpec([conv_layer(channels, mid, 1), conv_layer(mid, growth_rate, 3)]))
            channels += growth_rate
        stages.append(specs)
    return Skeleton(stem, nn.Identity(), stages)


def timm_densenet_skeleton(growth_rate: int = 32, block_config=(6, 12, 24, 16), in_chans: int = 3) -> Skeleton:
    """The weight layers of timm's ImageNet DenseNet."""
    from timm.models.densenet import DenseNet
    return extract_skeleton(DenseNet(growth_rate, tuple(block_config), in_chans=in_chans, num_classes=0))[0]


default_cfgs = generate_default_cfgs(add_pretrained_tags({
    'cifar_densenet_bc100.untrained': _cifar_cfg(),
    'uout_densenet_bc100.untrained': _cifar_cfg(),
    'uout_densenet121.untrained': _imagenet_cfg(),
}))


@register_model
def cifar_densenet_bc100(pretrained: bool = False, **kwargs) -> PlacedNet:
    """DenseNet-BC (L=100, k=12) with DenseNet's BN-ReLU-conv: the baseline skeleton."""
    return create_placed_model('cifar_densenet_bc100', pretrained, densenet_bc_skeleton, 'pre', num_stages=3,
                               feature_input_size=(32, 32), **kwargs)


@register_model
def uout_densenet_bc100(pretrained: bool = False, **kwargs) -> PlacedNet:
    """DenseNet-BC (L=100, k=12) with Uout (beta 0.2, the setting of Li et al. 2019's CIFAR-100 result) before
    every conv after the stem."""
    return create_placed_model('uout_densenet_bc100', pretrained, densenet_bc_skeleton, UOUT, num_stages=3,
                               feature_input_size=(32, 32), **kwargs)


@register_model
def uout_densenet121(pretrained: bool = False, **kwargs) -> PlacedNet:
    """DenseNet-121 with Uout before every conv after the stem (Li et al. 2019); beta 0.2 is their CIFAR-100 setting,
    its use on ImageNet is ours."""
    return create_placed_model('uout_densenet121', pretrained, partial(timm_densenet_skeleton, 32, (6, 12, 24, 16)),
                               UOUT, num_stages=4, feature_input_size=(224, 224), **kwargs)
