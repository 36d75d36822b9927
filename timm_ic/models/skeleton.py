"""Skeletons: the weight layers of a CNN, and the extractors that take them out of timm's models.

A *skeleton* is what a CNN is made of once norms, activations and dropouts are taken away: the stem's
weight layers, the stages of residual blocks (their convs and shortcut projection), dense layers and
transitions, and the classifier. `build_placed_net` (models/placed.py) lays a `Placement` over one.

`extract_skeleton(model)` reads it from timm's ResNet, ResNetV2 (pre-activation) and DenseNet, keeping the
source model's norms where a placement may reuse them (`Skeleton.source_norms`); a model class with its own
`extract_skeleton` method (timm_ic's PlacedNet) answers for itself. The CIFAR families build their
skeletons directly (models/ic_resnet.py, models/ic_densenet.py). A new family: write its extractor here,
or a `*_skeleton` function beside its entrypoints.
"""
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch.nn as nn

__all__ = ['ResidualSpec', 'DenseLayerSpec', 'TransitionSpec', 'BlockSpec', 'Skeleton', 'extract_skeleton',
           'SUPPORTED_FAMILIES']


# ----------------------------------------------------------------------------------------------------
# Skeleton: weight layers, plus the source model's norms where they can be kept
# ----------------------------------------------------------------------------------------------------

@dataclass
class ResidualSpec:
    """A residual block: `convs` in branch order, an optional shortcut projection (pool, conv)."""
    convs: List[nn.Conv2d]
    shortcut_conv: Optional[nn.Conv2d] = None
    shortcut_pool: Optional[nn.Module] = None
    attn: Optional[nn.Module] = None  # channel attention at the end of the branch (timm's SE/ECA)
    drop_path: Optional[nn.Module] = None


@dataclass
class DenseLayerSpec:
    """A DenseNet layer: its convs; the output is concatenated to the input."""
    convs: List[nn.Conv2d]


@dataclass
class TransitionSpec:
    """A DenseNet transition: a 1x1 conv then pooling."""
    conv: nn.Conv2d
    pool: nn.Module


BlockSpec = Union[ResidualSpec, DenseLayerSpec, TransitionSpec]


@dataclass
class Skeleton:
    stem: nn.Module  # the stem's weight layers: a conv, or a Sequential ending in one (deep stems keep theirs)
    stem_pool: nn.Module
    stages: List[List[BlockSpec]]
    fc: Optional[nn.Linear] = None  # classifier weights to keep, if any
    # norms of the source model that may be kept, by (id(weight layer), 'pre' | 'post') and ('final', 'pre');
    # a kept norm must be a BatchNorm of the channel count the placement needs there
    source_norms: Dict[Tuple[object, str], nn.Module] = field(default_factory=dict)
    # the family's own pre-activation design normalizes the stem (conv-norm-act-pool: ImageNet DenseNet);
    # False: the stem conv feeds the pool and the first unit normalizes (timm's ResNetV2, He's CIFAR code)
    preact_stem_norm: bool = False


# ----------------------------------------------------------------------------------------------------
# Extractors
# ----------------------------------------------------------------------------------------------------

SUPPORTED_FAMILIES = (
    'timm ResNet (BasicBlock, Bottleneck: resnet18-152, resnext, wide_resnet, seresnet, resnet-d)',
    'timm ResNetV2 pre-activation (PreActBasic, PreActBottleneck)',
    'timm DenseNet',
    'timm_ic PlacedNet (every timm_ic model)',
)


def _unsupported(what: str) -> ValueError:
    return ValueError(f'rewrite does not support {what}; supported families: {"; ".join(SUPPORTED_FAMILIES)}')


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _split_stem(children: List[Tuple[str, nn.Module]]) -> Tuple[nn.Module, nn.Module, Optional[nn.Module]]:
    """(weight part up to its last conv, pooling after it, the norm right after the last conv if any)."""
    last = max((i for i, (_, m) in enumerate(children) if any(isinstance(x, nn.Conv2d) for x in m.modules())),
               default=None)
    if last is None:
        raise _unsupported('a stem without a conv')
    weights = children[:last + 1]
    rest = children[last + 1:]
    norm = rest[0][1] if rest and isinstance(rest[0][1], nn.modules.batchnorm._BatchNorm) else None
    # what follows the stem's norm(-act) is its pooling (and the padding before it)
    pool = [(n, m) for n, m in rest if not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Identity))]
    stem = weights[0][1] if len(weights) == 1 else nn.Sequential(OrderedDict(weights))
    stem_pool = nn.Sequential(OrderedDict(pool)) if len(pool) > 1 else (pool[0][1] if pool else nn.Identity())
    return stem, stem_pool, norm


def _timm_resnet(model) -> Tuple[Skeleton, Dict]:
    from timm.models.resnet import BasicBlock, Bottleneck
    stem_parts = [('conv1', model.conv1), ('bn1', model.bn1), ('maxpool', model.maxpool)]
    stem, stem_pool, _ = _split_stem(stem_parts)
    norms = {(id(_last_conv(model.conv1)), 'post'): model.bn1}
    stages = []
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
        specs = []
        for i, blk in enumerate(getattr(model, name)):
            where = f'{name}.{i}'
            if isinstance(blk, Bottleneck):
                pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2), (blk.conv3, blk.bn3)]
            elif isinstance(blk, BasicBlock):
                pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2)]
            else:
                raise _unsupported(f'block {type(blk).__name__} at {where}')
            if not _is_identity(blk.aa) or not _is_identity(blk.drop_block):
                raise _unsupported(f'anti-aliasing or DropBlock inside blocks (at {where})')
            for conv, bn in pairs:
                norms[(id(conv), 'post')] = bn
            spec = ResidualSpec([c for c, _ in pairs], attn=blk.se, drop_path=blk.drop_path)
            if blk.downsample is not None:
                spec.shortcut_conv, spec.shortcut_pool, bn = _split_shortcut(blk.downsample, where)
                if bn is not None:
                    norms[(id(spec.shortcut_conv), 'post')] = bn
            specs.append(spec)
        stages.append(specs)
    first_conv = 'stem.conv' if isinstance(stem, nn.Conv2d) else 'stem.conv.0'
    return Skeleton(stem, stem_pool, stages, fc=_linear(model.fc), source_norms=norms), dict(
        first_conv=first_conv, global_pool=model.global_pool.pool_type)


def _split_shortcut(downsample: nn.Module, where: str) -> Tuple[nn.Conv2d, Optional[nn.Module], Optional[nn.Module]]:
    mods = list(downsample.children()) if len(list(downsample.children())) else [downsample]
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    if len(convs) != 1:
        raise _unsupported(f'a shortcut of {len(convs)} convs at {where}')
    idx = mods.index(convs[0])
    pool = [m for m in mods[:idx] if not _is_identity(m)]
    norms = [m for m in mods[idx + 1:] if not _is_identity(m)]
    return convs[0], (pool[0] if pool else None), (norms[0] if norms else None)


def _timm_resnetv2(model) -> Tuple[Skeleton, Dict]:
    from timm.models.resnetv2 import PreActBasic, PreActBottleneck
    stem, stem_pool, _ = _split_stem(list(model.stem.named_children()))
    norms = {}
    stages = []
    for si, stage in enumerate(model.stages):
        specs = []
        for bi, blk in enumerate(stage.blocks):
            where = f'stages.{si}.blocks.{bi}'
            if isinstance(blk, PreActBottleneck):
                pairs = [(blk.conv1, blk.norm1), (blk.conv2, blk.norm2), (blk.conv3, blk.norm3)]
            elif isinstance(blk, PreActBasic):
                pairs = [(blk.conv1, blk.norm1), (blk.conv2, blk.norm2)]
            else:
                raise _unsupported(f'block {type(blk).__name__} at {where}')
            for conv, norm in pairs:
                norms[(id(conv), 'pre')] = norm
            spec = ResidualSpec([c for c, _ in pairs], drop_path=None if _is_identity(blk.drop_path) else blk.drop_path)
            if blk.downsample is not None:
                spec.shortcut_conv, spec.shortcut_pool, _ = _split_shortcut(blk.downsample, where)
            specs.append(spec)
        stages.append(specs)
    norms[('final', 'pre')] = model.norm
    first_conv = 'stem.conv' if isinstance(stem, nn.Conv2d) else 'stem.conv.' + next(
        n for n, m in stem.named_children() if isinstance(m, nn.Conv2d))
    return Skeleton(stem, stem_pool, stages, fc=_linear(model.head.fc), source_norms=norms), dict(
        first_conv=first_conv, global_pool=model.head.global_pool.pool_type)


def _timm_densenet(model) -> Tuple[Skeleton, Dict]:
    from timm.models.densenet import DenseBlock, DenseTransition
    children = list(model.features.named_children())
    first_block = next(i for i, (_, m) in enumerate(children) if isinstance(m, DenseBlock))
    stem, stem_pool, stem_norm = _split_stem(children[:first_block])
    norms = {(id(_last_conv(stem)), 'post'): stem_norm} if stem_norm is not None else {}
    stages, pending = [], []
    for name, m in children[first_block:]:
        if isinstance(m, DenseBlock):
            for layer in m.values():
                norms[(id(layer.conv1), 'pre')] = layer.norm1
                norms[(id(layer.conv2), 'pre')] = layer.norm2
                pending.append(DenseLayerSpec([layer.conv1, layer.conv2]))
            stages.append(pending)
            pending = []
        elif isinstance(m, DenseTransition):
            norms[(id(m.conv), 'pre')] = m.norm
            pending.append(TransitionSpec(m.conv, m.pool))
        elif name.startswith('norm'):
            norms[('final', 'pre')] = m
        else:
            raise _unsupported(f'{type(m).__name__} at features.{name}')
    return Skeleton(stem, stem_pool, stages, fc=_linear(model.classifier), source_norms=norms,
                    preact_stem_norm=stem_norm is not None), dict(
        first_conv='stem.conv' if isinstance(stem, nn.Conv2d) else 'stem.conv.0',
        global_pool=model.global_pool.pool_type)


def _linear(fc: nn.Module) -> Optional[nn.Linear]:
    if isinstance(fc, nn.Linear):
        return fc
    if isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1):  # BiT's 1x1-conv classifier
        linear = nn.Linear(fc.in_channels, fc.out_channels, bias=fc.bias is not None, device=fc.weight.device)
        linear.weight = nn.Parameter(fc.weight.detach().flatten(1))
        if fc.bias is not None:
            linear.bias = fc.bias
        return linear
    return None


def extract_skeleton(model: nn.Module) -> Tuple[Skeleton, Dict]:
    """The weight layers of a supported model, and cfg facts (first_conv, global_pool). Raises ValueError
    naming the supported families for anything else."""
    from timm.models.densenet import DenseNet
    from timm.models.resnet import ResNet
    from timm.models.resnetv2 import ResNetV2
    own = getattr(type(model), 'extract_skeleton', None)  # PlacedNet (models/placed.py) knows its own
    if callable(own):
        return own(model)
    if isinstance(model, ResNet):
        return _timm_resnet(model)
    if isinstance(model, ResNetV2):
        if _is_identity(model.norm):
            raise _unsupported('ResNetV2 without pre-activation (its blocks are post-activation Bottlenecks)')
        return _timm_resnetv2(model)
    if isinstance(model, DenseNet):
        return _timm_densenet(model)
    raise _unsupported(f'{type(model).__name__}')


def _last_conv(module: nn.Module) -> nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f'the stem {type(module).__name__} has no conv')
    return convs[-1]
