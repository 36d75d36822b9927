"""The placement rewriter: any supported CNN, with norm and dropout placed as a paper says.

`rewrite(model, placement)` takes the model's skeleton (its weight layers) and lays the placement over it
with `build_placed_net`. What is kept and what is new:
- kept, the same tensors: every conv (stem, branches, shortcut projections, transitions), any channel
  attention (SE) and drop-path module, the classifier when its shape fits, the pooling layers;
- kept where they still fit: BatchNorms that stay on the same side of the same weight layer with the same
  width (e.g. `post` over a timm ResNet keeps all of them, `pre` over a timm ResNetV2 too; timm's
  BatchNormAct2d becomes a plain BatchNorm2d with the same statistics);
- new, initialised as timm does (weight 1, bias 0, fresh statistics): every other norm. A norm that moves
  to the other side of a weight layer changes width (in_channels vs out_channels), so it cannot be kept;
- dropped: a timm ResNet's stem norm-act (`bn1`, `act1`) under a pre-activation placement (`pre`, `ic`,
  `kim`): the stem conv then feeds the max pool directly and the first unit's new norm normalizes the pooled
  output, as in timm's ResNetV2, so that no unit sees two norms in a row. A DenseNet keeps its stem norm-act
  under `pre` (its own design; see `timm_ic.models.placed`).
Fine-tune after a rewrite that moved norms: the network computes a different function until then.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .models.placed import (
    DenseLayer, DenseLayerSpec, PlacedNet, ResidualBlock, ResidualSpec, Skeleton, Transition, TransitionSpec,
    build_placed_net,
)
from .placement import Placement

__all__ = ['rewrite', 'extract_skeleton', 'SUPPORTED_FAMILIES']

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


def _placed_net(model: PlacedNet) -> Tuple[Skeleton, Dict]:
    norms = {}

    def keep(unit) -> nn.Conv2d:
        for side in ('pre', 'post'):
            seq = getattr(unit, side)
            if 'norm' in seq._modules:
                norms[(id(unit.conv), side)] = seq.norm
        return unit.conv

    stem = model.stem.conv
    if 'norm' in model.stem._modules:
        norms[(id(_last_conv(stem)), 'post')] = model.stem.norm
    if 'norm' in getattr(model.final, '_modules', {}):
        norms[('final', 'pre')] = model.final.norm
    stages = []
    for stage in model.stages:
        specs = []
        for blk in stage:
            if isinstance(blk, ResidualBlock):
                spec = ResidualSpec([keep(u) for u in blk.units],
                                    attn=None if _is_identity(blk.attn) else blk.attn,
                                    drop_path=None if _is_identity(blk.drop_path) else blk.drop_path)
                if blk.downsample is not None:
                    ds = blk.downsample
                    spec.shortcut_conv, spec.shortcut_pool = ds.conv, getattr(ds, 'pool', None)
                    if 'norm' in ds._modules:
                        norms[(id(ds.conv), 'post')] = ds.norm
                specs.append(spec)
            elif isinstance(blk, DenseLayer):
                specs.append(DenseLayerSpec([keep(u) for u in blk.units]))
            elif isinstance(blk, Transition):
                specs.append(TransitionSpec(keep(blk.unit), blk.pool))
            else:
                raise _unsupported(f'block {type(blk).__name__}')
        stages.append(specs)
    first_conv = model.pretrained_cfg.get('first_conv') if hasattr(model, 'pretrained_cfg') else None
    return Skeleton(stem, model.stem_pool, stages, fc=_linear(model.fc), source_norms=norms,
                    preact_stem_norm=getattr(model, 'preact_stem_norm', False)), dict(
        first_conv=first_conv or 'stem.conv', global_pool=model.global_pool.pool_type)


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


def _last_conv(module: nn.Module) -> nn.Conv2d:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def extract_skeleton(model: nn.Module) -> Tuple[Skeleton, Dict]:
    """The weight layers of a supported model, and cfg facts (first_conv, global_pool). Raises ValueError
    naming the supported families for anything else."""
    from timm.models.densenet import DenseNet
    from timm.models.resnet import ResNet
    from timm.models.resnetv2 import ResNetV2
    if isinstance(model, PlacedNet):
        return _placed_net(model)
    if isinstance(model, ResNet):
        return _timm_resnet(model)
    if isinstance(model, ResNetV2):
        if _is_identity(model.norm):
            raise _unsupported('ResNetV2 without pre-activation (its blocks are post-activation Bottlenecks)')
        return _timm_resnetv2(model)
    if isinstance(model, DenseNet):
        return _timm_densenet(model)
    raise _unsupported(f'{type(model).__name__}')


def rewrite(
        model: nn.Module,
        placement: Union[Placement, str],
        zero_init_last: bool = False,
) -> PlacedNet:
    """`model` with `placement` applied to every residual branch, transition and the head.

    Returns a new PlacedNet that shares `model`'s weight layers (see the module docstring for what is kept).
    Works on the meta device. Raises ValueError for an unsupported model or a placement that cannot apply
    (the message names the supported families or the setting and the layer).
    """
    placement = Placement.parse(placement)
    skeleton, facts = extract_skeleton(model)
    stem_conv = _last_conv(skeleton.stem)
    first = [m for m in skeleton.stem.modules() if isinstance(m, nn.Conv2d)][0]
    cfg = dict(getattr(model, 'pretrained_cfg', {}) or {})
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))[1:]
    device = stem_conv.weight.device
    with torch.device(device):
        net = build_placed_net(
            skeleton, placement, num_classes=getattr(model, 'num_classes', 1000), global_pool=facts['global_pool'],
            in_chans=first.in_channels, zero_init_last=zero_init_last, feature_input_size=input_size)
    cfg.update(first_conv=facts['first_conv'], classifier='fc')
    net.pretrained_cfg = net.default_cfg = cfg
    return net
