"""Residual networks with paper placements: timm's ImageNet ResNets rewritten, and the CIFAR skeletons timm lacks.

CIFAR skeletons (32x32 input, 3x3 stem conv of 16 channels, three stages of stride 1, 2, 2):
- He et al. 2015/2016 CIFAR ResNets: depth 6n+2 with basic blocks (20, 56, 110), 9n+2 with bottlenecks
  (164, widths 16/32/64 x4). Shortcuts project with a 1x1 conv where the shape changes (option B).
- Zagoruyko & Komodakis Wide ResNets WRN-d-k: basic blocks, n=(d-4)/6 per stage, widths 16k/32k/64k.
Each skeleton has a plain baseline entrypoint (`cifar_*`: `post` for ResNets, `pre` for pre-activation
ResNets and WRNs) so every comparison runs on the same weight layers.

IC and Kim placements are pre-activation: every weight layer after the stem conv has its IC layer (or BN-ReLU)
before it; the stem conv sees the image and has none. On the ImageNet skeletons the stem conv feeds the max
pool directly and the first unit normalizes, as in timm's ResNetV2 (`ic_resnet50` has resnetv2_50's
25,549,352 parameters), so no unit sees two norms in a row; the CIFAR stems have no pool and no norm.
"""
from functools import partial
from typing import Sequence

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs

from ..placement import Placement
from ._registry import register_model
from .placed import PlacedNet, ResidualSpec, Skeleton, conv_layer, create_placed_model
from .skeleton import extract_skeleton
from .tags import add_pretrained_tags

__all__ = ['cifar_resnet_skeleton', 'wide_resnet_skeleton', 'timm_resnet_skeleton']

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cifar_resnet_skeleton(
        depth: int,
        bottleneck: bool = False,
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int = 16,
        in_chans: int = 3,
) -> Skeleton:
    """He et al.'s CIFAR ResNet weight layers: depth 6n+2 (basic) or 9n+2 (bottleneck, expansion 4)."""
    per_block = 9 if bottleneck else 6
    if depth < per_block + 2 or (depth - 2) % per_block:
        kind = '9n+2 (bottleneck)' if bottleneck else '6n+2 (basic)'
        raise ValueError(f'CIFAR ResNet depth must be {kind}, got {depth}')
    n = (depth - 2) // per_block
    expansion = 4 if bottleneck else 1
    stem = conv_layer(in_chans, stem_width)
    stages, in_chs = [], stem_width
    for si, width in enumerate(widths):
        blocks = []
        for bi in range(n):
            stride = 2 if si > 0 and bi == 0 else 1
            out_chs = width * expansion
            if bottleneck:
                convs = [conv_layer(in_chs, width, 1), conv_layer(width, width, 3, stride), conv_layer(width, out_chs, 1)]
            else:
                convs = [conv_layer(in_chs, width, 3, stride), conv_layer(width, width)]
            shortcut = conv_layer(in_chs, out_chs, 1, stride) if stride != 1 or in_chs != out_chs else None
            blocks.append(ResidualSpec(convs, shortcut_conv=shortcut))
            in_chs = out_chs
        stages.append(blocks)
    return Skeleton(stem, nn.Identity(), stages)


def wide_resnet_skeleton(depth: int, widen_factor: int, in_chans: int = 3) -> Skeleton:
    """WRN-d-k weight layers: (d-4)/6 basic blocks per stage, widths 16k, 32k, 64k."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f'Wide ResNet depth must be 6n+4, got {depth}')
    k = widen_factor
    return cifar_resnet_skeleton((depth - 4) // 6 * 6 + 2, widths=(16 * k, 32 * k, 64 * k), in_chans=in_chans)


def timm_resnet_skeleton(layers: Sequence[int], bottleneck: bool, in_chans: int = 3, **resnet_kwargs) -> Skeleton:
    """The weight layers of timm's ImageNet ResNet (7x7 stem, max pool, four stages)."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    source = ResNet(Bottleneck if bottleneck else BasicBlock, list(layers), in_chans=in_chans, num_classes=0,
                    **resnet_kwargs)
    return extract_skeleton(source)[0]


def _create_cifar(variant: str, pretrained: bool, default_placement: str, skeleton_fn, **kwargs) -> PlacedNet:
    return create_placed_model(variant, pretrained, skeleton_fn, default_placement, num_stages=3,
                               feature_input_size=(32, 32), **kwargs)


def _create_imagenet(variant: str, pretrained: bool, default_placement: str, layers, bottleneck: bool, **kwargs) -> PlacedNet:
    skeleton_fn = partial(timm_resnet_skeleton, layers, bottleneck)
    return create_placed_model(variant, pretrained, skeleton_fn, default_placement, num_stages=4,
                               feature_input_size=(224, 224), **kwargs)


def _cifar_cfg(**kwargs):
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': CIFAR_MEAN, 'std': CIFAR_STD,
        'first_conv': 'stem.conv', 'classifier': 'fc', 'license': 'apache-2.0', **kwargs,
    }


def _imagenet_cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'fc', 'license': 'apache-2.0', **kwargs,
    }


# WRN's own dropout position (between the convs, after BN-ReLU) with Uout instead of Bernoulli dropout, at
# beta 0.2: the one Uout setting Li et al. 2019 report an accuracy result for (CIFAR-100, DenseNet and WRN)
UOUT_WRN = str(Placement.preset('pre', drop='uout', beta=0.2, drop_units='last'))

default_cfgs = generate_default_cfgs(add_pretrained_tags({
    **{f'ic_resnet{d}.untrained': _imagenet_cfg() for d in (18, 34, 50, 101, 152)},
    'kim_resnet50.untrained': _imagenet_cfg(),
    **{f'{prefix}{d}.untrained': _cifar_cfg() for prefix in ('cifar_resnet', 'cifar_preresnet', 'ic_resnet')
       for d in (20, 56, 110, 164)},
    'kim_preresnet110.untrained': _cifar_cfg(),
    **{f'cifar_wrn{d}_{k}.untrained': _cifar_cfg() for d, k in ((28, 10), (16, 8), (40, 4))},
    'ic_wrn28_10.untrained': _cifar_cfg(),
    'kim_wrn28_10.untrained': _cifar_cfg(),
    'uout_wrn28_10.untrained': _cifar_cfg(),
}))
# the CIFAR 'ic_resnet20/56/110/164' share a prefix with the ImageNet 'ic_resnet18/34/50/101/152': depths tell them apart


# --- ImageNet: timm's ResNet skeletons
@register_model
def ic_resnet18(pretrained: bool = False, **kwargs) -> PlacedNet:
    """ResNet-18 with IC layers (ReLU-BN-Dropout-conv) before every weight layer after the stem conv (Chen et al.
    2019); the stem is conv then max pool, as in timm's ResNetV2."""
    return _create_imagenet('ic_resnet18', pretrained, 'ic', (2, 2, 2, 2), False, **kwargs)


@register_model
def ic_resnet34(pretrained: bool = False, **kwargs) -> PlacedNet:
    """ResNet-34 with IC layers before every weight layer after the stem conv (Chen et al. 2019)."""
    return _create_imagenet('ic_resnet34', pretrained, 'ic', (3, 4, 6, 3), False, **kwargs)


@register_model
def ic_resnet50(pretrained: bool = False, **kwargs) -> PlacedNet:
    """ResNet-50 with IC layers before every weight layer after the stem conv (Chen et al. 2019)."""
    return _create_imagenet('ic_resnet50', pretrained, 'ic', (3, 4, 6, 3), True, **kwargs)


@register_model
def ic_resnet101(pretrained: bool = False, **kwargs) -> PlacedNet:
    """ResNet-101 with IC layers before every weight layer after the stem conv (Chen et al. 2019)."""
    return _create_imagenet('ic_resnet101', pretrained, 'ic', (3, 4, 23, 3), True, **kwargs)


@register_model
def ic_resnet152(pretrained: bool = False, **kwargs) -> PlacedNet:
    """ResNet-152 with IC layers before every weight layer after the stem conv (Chen et al. 2019)."""
    return _create_imagenet('ic_resnet152', pretrained, 'ic', (3, 8, 36, 3), True, **kwargs)


@register_model
def kim_resnet50(pretrained: bool = False, **kwargs) -> PlacedNet:
    """Pre-activation ResNet-50 (stem conv then max pool, as timm's ResNetV2), one dropout per branch before its
    last conv, head dropout before pooling (Kim et al. 2023; the rates are ours)."""
    return _create_imagenet('kim_resnet50', pretrained, 'kim', (3, 4, 6, 3), True, **kwargs)


# --- CIFAR ResNets (He et al.): baselines
@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-20, conv-BN-ReLU (He et al. 2015): the baseline skeleton."""
    return _create_cifar('cifar_resnet20', pretrained, 'post', partial(cifar_resnet_skeleton, 20), **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-56, conv-BN-ReLU (He et al. 2015)."""
    return _create_cifar('cifar_resnet56', pretrained, 'post', partial(cifar_resnet_skeleton, 56), **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-110, conv-BN-ReLU (He et al. 2015)."""
    return _create_cifar('cifar_resnet110', pretrained, 'post', partial(cifar_resnet_skeleton, 110), **kwargs)


@register_model
def cifar_resnet164(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-164 (bottleneck), conv-BN-ReLU."""
    return _create_cifar('cifar_resnet164', pretrained, 'post',
                         partial(cifar_resnet_skeleton, 164, bottleneck=True), **kwargs)


@register_model
def cifar_preresnet20(pretrained: bool = False, **kwargs) -> PlacedNet:
    """Pre-activation CIFAR ResNet-20, BN-ReLU-conv (He et al. 2016)."""
    return _create_cifar('cifar_preresnet20', pretrained, 'pre', partial(cifar_resnet_skeleton, 20), **kwargs)


@register_model
def cifar_preresnet56(pretrained: bool = False, **kwargs) -> PlacedNet:
    """Pre-activation CIFAR ResNet-56 (He et al. 2016)."""
    return _create_cifar('cifar_preresnet56', pretrained, 'pre', partial(cifar_resnet_skeleton, 56), **kwargs)


@register_model
def cifar_preresnet110(pretrained: bool = False, **kwargs) -> PlacedNet:
    """Pre-activation CIFAR ResNet-110 (He et al. 2016)."""
    return _create_cifar('cifar_preresnet110', pretrained, 'pre', partial(cifar_resnet_skeleton, 110), **kwargs)


@register_model
def cifar_preresnet164(pretrained: bool = False, **kwargs) -> PlacedNet:
    """Pre-activation CIFAR ResNet-164 (bottleneck, He et al. 2016)."""
    return _create_cifar('cifar_preresnet164', pretrained, 'pre',
                         partial(cifar_resnet_skeleton, 164, bottleneck=True), **kwargs)


# --- CIFAR ResNets with paper placements
@register_model
def ic_resnet20(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-20 with IC layers before every weight layer after the stem conv (Chen et al. 2019)."""
    return _create_cifar('ic_resnet20', pretrained, 'ic', partial(cifar_resnet_skeleton, 20), **kwargs)


@register_model
def ic_resnet56(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-56 with IC layers (Chen et al. 2019)."""
    return _create_cifar('ic_resnet56', pretrained, 'ic', partial(cifar_resnet_skeleton, 56), **kwargs)


@register_model
def ic_resnet110(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-110 with IC layers (Chen et al. 2019)."""
    return _create_cifar('ic_resnet110', pretrained, 'ic', partial(cifar_resnet_skeleton, 110), **kwargs)


@register_model
def ic_resnet164(pretrained: bool = False, **kwargs) -> PlacedNet:
    """CIFAR ResNet-164 (bottleneck) with IC layers (Chen et al. 2019)."""
    return _create_cifar('ic_resnet164', pretrained, 'ic',
                         partial(cifar_resnet_skeleton, 164, bottleneck=True), **kwargs)


@register_model
def kim_preresnet110(pretrained: bool = False, **kwargs) -> PlacedNet:
    """Pre-activation CIFAR ResNet-110 with Kim et al.'s dropout placement (Kim et al. 2023; the rates are ours).
    Its baseline is `cifar_preresnet110`, the same network without the dropouts."""
    return _create_cifar('kim_preresnet110', pretrained, 'kim', partial(cifar_resnet_skeleton, 110), **kwargs)


# --- Wide ResNets
@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs) -> PlacedNet:
    """WRN-28-10, BN-ReLU-conv without dropout: the baseline skeleton."""
    return _create_cifar('cifar_wrn28_10', pretrained, 'pre', partial(wide_resnet_skeleton, 28, 10), **kwargs)


@register_model
def cifar_wrn16_8(pretrained: bool = False, **kwargs) -> PlacedNet:
    """WRN-16-8, BN-ReLU-conv without dropout."""
    return _create_cifar('cifar_wrn16_8', pretrained, 'pre', partial(wide_resnet_skeleton, 16, 8), **kwargs)


@register_model
def cifar_wrn40_4(pretrained: bool = False, **kwargs) -> PlacedNet:
    """WRN-40-4, BN-ReLU-conv without dropout."""
    return _create_cifar('cifar_wrn40_4', pretrained, 'pre', partial(wide_resnet_skeleton, 40, 4), **kwargs)


@register_model
def ic_wrn28_10(pretrained: bool = False, **kwargs) -> PlacedNet:
    """WRN-28-10 with IC layers before every weight layer after the stem conv (Chen et al. 2019)."""
    return _create_cifar('ic_wrn28_10', pretrained, 'ic', partial(wide_resnet_skeleton, 28, 10), **kwargs)


@register_model
def kim_wrn28_10(pretrained: bool = False, **kwargs) -> PlacedNet:
    """WRN-28-10 with Kim et al.'s placement (WRN's own dropout position, head dropout before pooling; the rates
    are ours)."""
    return _create_cifar('kim_wrn28_10', pretrained, 'kim', partial(wide_resnet_skeleton, 28, 10), **kwargs)


@register_model
def uout_wrn28_10(pretrained: bool = False, **kwargs) -> PlacedNet:
    """WRN-28-10 with Uout in WRN's dropout position (Li et al. 2019), beta 0.2 as in their CIFAR-100 result."""
    return _create_cifar('uout_wrn28_10', pretrained, UOUT_WRN, partial(wide_resnet_skeleton, 28, 10), **kwargs)
