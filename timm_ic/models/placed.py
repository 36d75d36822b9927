"""PlacedNet: a CNN skeleton (its weight layers) with norm, activation and dropout laid out by a Placement.

A *skeleton* (models/skeleton.py) is what a CNN is made of once norms, activations and dropouts are taken
away. `build_placed_net` lays a `Placement` over a skeleton; `extract_skeleton` takes skeletons out of timm
models (for the ImageNet families and `timm_ic.rewrite`) and the CIFAR families build theirs directly, so
every model of the package goes through this one builder.

Layout of a built network, in forward order (timm's model API on top):
    stem       weight layers of the stem, then norm-act for post-activation placements (see below)
    stem_pool  the stem's pooling (Identity for CIFAR stems)
    stages     nn.Sequential of stages; each stage an nn.Sequential of ResidualBlock / DenseLayer / Transition
    final      norm-act after the last stage for pre-activation placements (their blocks end on a conv)
    head_drop_pre, global_pool, head_drop, fc

The stem under pre-activation placements (`pre`, `ic`, `kim`): no unit sees two norms in a row, so the stem
conv feeds the pool directly and the first unit normalizes, as timm's ResNetV2 does (He et al.'s own
pre-activation code keeps the stem's BN-ReLU and skips the first unit's instead: the same parameter count).
A timm ResNet's `bn1` is dropped by such a rewrite (`post` keeps it): it normalized the conv output before
the pool, which no norm sees any more. The one exception is a family whose own design normalizes the stem
(`Skeleton.preact_stem_norm`: timm's ImageNet DenseNet, conv-BN-ReLU-pool, as in Huang et al.): its stem
keeps its norm-act under placements whose units open with norm-act (`pre` and its Uout variants), so
`rewrite(densenet121, 'pre')` computes what timm's densenet121 does; there the first dense layer's BN-ReLU
follows the stem's, as in DenseNet itself. Under any other order (`ic`: ReLU-BN) the DenseNet stem has no
norm either.
"""
import contextlib
import copy
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules import module as torch_module
from timm.layers import create_classifier, get_act_layer, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models import checkpoint_seq

from ..layers import GROUPED_NORMS, NORMS_WITH_ACT, Dropout, Uout, bn_affine, can_fold_into, create_conv, \
    create_dropout, create_norm, fold_bn_after_conv, fold_bn_after_relu, fold_bn_before_conv, fold_bn_before_linear, \
    is_eval_identity, resolve_groups, split_norm_act
from ..placement import Placement
from .pretrained import build_model_with_checks
from .skeleton import (
    BlockSpec, DenseLayerSpec, ResidualSpec, Skeleton, TransitionSpec, _is_identity, _last_conv, _linear, _unsupported,
)

__all__ = [
    'PlacedNet', 'Slot', 'Unit', 'ResidualBlock', 'DenseLayer', 'Transition', 'build_placed_net', 'create_placed_model',
    'conv_layer',
]


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------

def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (the test of `nn.Module._call_impl`'s fast path)."""
    g = torch_module  # torch's global hooks live there
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


@torch.jit.unused
def _tracing() -> bool:
    # compiling first: dynamo would not trace fx's thread-local flag
    return torch.compiler.is_compiling() or is_fx_symbolic_tracing()


class Slot(nn.Sequential):
    """The modules a placement puts in one slot (norm, act, drop, in the placement's order), run in turn.

    In eager training, a ReLU right before a dropout or Uout runs as one op (their `forward_after_relu`; on CPU
    one autograd function): the same values from the same draws, without keeping the ReLU's output for backward
    as well as the dropout's output (4 bytes per element in float32; DenseNet's BN-ReLU-Uout before each conv,
    Kim et al.'s BN-ReLU-dropout). Its output, saved for backward, must not be changed in place, as a ReLU's
    must not. Modules with hooks, TorchScript, torch.compile and FX tracing (whose graph keeps each module's node,
    as feature extractors expect) run the modules as themselves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.training and not _tracing():
            return self._forward_fused(x)
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        i = 0
        while i < len(modules):
            first, second = modules[i], modules[i + 1] if i + 1 < len(modules) else None
            fusable = type(first) is nn.ReLU and type(second) in (Dropout, Uout)
            if fusable and not (_hooked(first) or _hooked(second)):
                x = second.forward_after_relu(x)
                i += 2
            else:
                x = first(x)
                i += 1
        return x


class Unit(nn.Module):
    """One weight layer with the slots the placement puts before (`pre`) and after (`post`) it."""

    def __init__(self, pre: nn.Sequential, conv: nn.Module, post: nn.Sequential):
        super().__init__()
        self.pre = pre
        self.conv = conv
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.conv(self.pre(x)))

    def fuse(self) -> 'Unit':
        """Fold the eval BatchNorm right before (IC: act-norm-drop-conv) and right after (post: conv-norm-act)
        the weight layer into it, in place (timm's `reparameterize_model` calls this). Exact in eval only: a
        dropout left between is the identity there. A pre-norm shared with a projection (`pre_shared`) is
        left to the block."""
        name = None if getattr(self, 'pre_shared', False) else _norm_before(self.pre)
        if name is not None and can_fold_into(self.conv, before=True):
            self.conv = fold_bn_before_conv(getattr(self.pre, name), self.conv)
            delattr(self.pre, name)
        _fold_norm_after(self.post, self, 'conv')
        return self


@torch.fx.wrap  # one node in a traced graph: its branch reads tensor attributes
@register_notrace_function
def residual_sum(branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """branch + shortcut. In inference it goes into `branch`, a tensor the block made (its last unit's output):
    one activation-sized allocation fewer, which on CPU costs about as much as the add. With grad, or where the
    sum would promote or broadcast, it is out of place."""
    if torch.is_grad_enabled() or branch.dtype != shortcut.dtype or branch.shape != shortcut.shape:
        return branch + shortcut
    return branch.add_(shortcut)


class ResidualBlock(nn.Module):
    """shortcut + branch. Pre-activation: the projection takes the first unit's normalized input (He et al.
    2016); post-activation: it takes the raw input and `act` follows the sum (He et al. 2015)."""

    def __init__(
            self,
            units: Sequence[Unit],
            downsample: Optional[nn.Module] = None,
            attn: Optional[nn.Module] = None,
            drop_path: Optional[nn.Module] = None,
            act: Optional[nn.Module] = None,
            preact: bool = True,
    ):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.downsample = downsample
        self.attn = attn if attn is not None else nn.Identity()
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.preact = preact
        if preact and downsample is not None:
            self.units[0].pre_shared = True  # the projection takes the first unit's normalized input

    def fuse(self) -> 'ResidualBlock':
        """Fold the BatchNorms the units cannot fold alone: a pre-activation block's first norm, shared by the
        first conv and the projection (folded into both), and a post-activation projection's norm."""
        ds = self.downsample
        if isinstance(ds, nn.Sequential) and 'conv' in ds._modules:
            if not self.preact:
                _fold_norm_after(ds, ds, 'conv')
            elif list(ds._modules) == ['conv']:  # a pool before the projection keeps the norm
                u0 = self.units[0]
                name = _norm_before(u0.pre)
                if name is not None and can_fold_into(u0.conv, before=True) and can_fold_into(ds.conv, before=True):
                    bn = getattr(u0.pre, name)
                    u0.conv, ds.conv = fold_bn_before_conv(bn, u0.conv), fold_bn_before_conv(bn, ds.conv)
                    delattr(u0.pre, name)
        _fold_across_units(self.units)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        for i, unit in enumerate(self.units):
            if i == 0:  # the projection branches off inside the first unit
                x = unit.pre(x)
                if self.downsample is not None:
                    shortcut = self.downsample(x if self.preact else shortcut)
                x = unit.post(unit.conv(x))
            else:
                x = unit(x)
        return self.act(residual_sum(self.drop_path(self.attn(x)), shortcut))


class DenseLayer(nn.Module):
    """DenseNet layer: the branch's output is concatenated to its input."""

    def __init__(self, units: Sequence[Unit]):
        super().__init__()
        self.units = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.units(x)], 1)

    def fuse(self) -> 'DenseLayer':
        """Fold the norm between two units into the first's conv (`_fold_across_units`; the units fold the rest)."""
        _fold_across_units(list(self.units))
        return self


class Transition(nn.Sequential):
    """DenseNet transition: one unit, then pooling."""

    def __init__(self, unit: Unit, pool: nn.Module):
        super().__init__(OrderedDict([('unit', unit), ('pool', pool)]))


class PlacedNet(nn.Module):
    """A CNN with its norm / activation / dropout placement made explicit; timm's model API.

    Build it with `build_placed_net` (from a skeleton) or `timm_ic.rewrite` (from a timm model).
    `placement` is the Placement it was built with.
    """

    def __init__(
            self,
            stem: nn.Module,
            stem_pool: nn.Module,
            stages: Sequence[nn.Sequential],
            final: nn.Module,
            num_features: int,
            placement: Placement,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            in_chans: int = 3,
            preact_stem_norm: bool = False,
    ):
        super().__init__()
        self.placement = placement
        self.preact_stem_norm = preact_stem_norm  # the skeleton's, kept for a later rewrite
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = num_features
        self.grad_checkpointing = False
        self.stem = stem
        self.stem_pool = stem_pool
        self.stages = nn.Sequential(*stages)
        self.final = final
        before, after = placement.head == 'before_pool', placement.head == 'after_pool'
        self.drop_rate = placement.head_rate if placement.head != 'none' else 0.0
        self.head_drop_pre = nn.Dropout(self.drop_rate) if before and self.drop_rate else nn.Identity()
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.head_drop = nn.Dropout(self.drop_rate) if after and self.drop_rate else nn.Identity()
        self.head_hidden_size = num_features * self.global_pool.feat_mult()
        self.feature_info = []  # filled by build_placed_net from a dry run

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        device = next(self.parameters()).device
        with torch.device(device):
            self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem and of each stage (timm's forward_intermediates). `norm` applies the final
        norm-act of pre-activation placements to the last stage's feature."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.stem_pool(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if i in take_indices:
                intermediates.append(self.final(x) if norm and i == num_stages else x)
        if intermediates_only:
            return intermediates
        if len(stages) == num_stages:
            x = self.final(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if max_index == 0:
            self.stem_pool = nn.Identity()
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.final = nn.Identity()  # sized for, and only applied to, the last stage
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < len(self.feature_info) - 1:
            self.reset_classifier(0, '')
        return take_indices

    def extract_skeleton(self) -> Tuple[Skeleton, Dict]:
        """This network's weight layers and its norms (see `timm_ic.models.skeleton.extract_skeleton`)."""
        return _placed_skeleton(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_pool(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(self.head_drop_pre(x)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def fuse(self) -> 'PlacedNet':
        """Fold every eval BatchNorm that sits next to a weight layer (no nonlinearity between, or a ReLU between
        two convs: `fold_bn_after_relu`) into it, in place, for inference. timm's `reparameterize_model(model)`
        calls the blocks' own `fuse` (it calls children only); this also folds the stem's norm (post-activation)
        and the final norm into the classifier (IC: act-norm, then global average pool, which commutes with BN's
        per-channel affine map).
        After it, `forward_intermediates(norm=True)` no longer applies that final norm."""
        from timm.models import reparameterize_model
        reparameterize_model(self, inplace=True)
        _fold_norm_after(self.stem, self.stem, 'conv')
        first = self.stages[0][0] if len(self.stages) and len(self.stages[0]) else None
        if list(self.stem._modules) == ['conv'] and is_eval_identity(self.stem_pool) and \
                isinstance(first, ResidualBlock) and first.preact and first.downsample is not None:
            # the stem conv feeds the first unit's norm alone (the projection takes the normalized input)
            _fold_norm_after(first.units[0].pre, self.stem, 'conv')
        name = _norm_before(self.final) if isinstance(self.final, nn.Sequential) else None
        if name is not None and self.global_pool.pool_type == 'avg' and type(self.fc) is nn.Linear \
                and is_eval_identity(self.head_drop_pre):
            self.fc = fold_bn_before_linear(getattr(self.final, name), self.fc)
            delattr(self.final, name)
        return self


def _norm_before(seq: nn.Sequential) -> Optional[str]:
    """The name of a foldable BatchNorm that ends `seq` but for dropouts (the identity in eval)."""
    for name, m in reversed(list(seq.named_children())):
        if bn_affine(m) is not None:
            return name
        if not is_eval_identity(m):
            return None
    return None


def _fold_across_units(units: Sequence[Unit]) -> None:
    """Pre-activation (norm-act-conv): a unit's opening norm takes the previous unit's conv output alone,
    so it folds into that conv (the standard conv-BN fold). IC (act-norm-drop-conv): ReLU then norm fold into the
    previous conv too (`fold_bn_after_relu`), leaving the unit's own conv without a bias map. After the fold, the
    unit's activation runs in place when only dropouts come before it: its input is that conv's fresh output,
    which nothing else reads (the first unit's input is the block's, shared with the shortcut or the
    concatenation, and stays untouched)."""
    for prev, unit in zip(units[:-1], units[1:]):
        if all(is_eval_identity(m) for m in prev.post):
            _fold_norm_after(unit.pre, prev, 'conv')
            _fold_relu_norm_after(unit, prev)
            names = list(unit.pre._modules)
            act = unit.pre._modules.get('act')
            if isinstance(getattr(act, 'inplace', None), bool) and \
                    all(is_eval_identity(unit.pre._modules[n]) for n in names[:names.index('act')]):
                act.inplace = True  # one activation-sized allocation fewer


def _fold_relu_norm_after(unit: Unit, prev: Unit) -> None:
    """A unit opening with ReLU then a foldable BatchNorm (dropouts between or after), whose input is `prev`'s
    conv output alone: the norm goes into prev's conv, the ReLU becomes its per-channel floor."""
    mods = list(unit.pre.named_children())
    if not mods or type(mods[0][1]) is not nn.ReLU:
        return
    rest = [(name, m) for name, m in mods[1:] if not is_eval_identity(m)]
    if len(rest) != 1 or bn_affine(rest[0][1]) is None or not can_fold_into(prev.conv, before=False) \
            or not can_fold_into(unit.conv, before=True):
        return
    prev.conv, floor, unit.conv = fold_bn_after_relu(prev.conv, rest[0][1], unit.conv)
    setattr(unit.pre, mods[0][0], floor)
    delattr(unit.pre, rest[0][0])


def _fold_norm_after(seq: nn.Sequential, owner: nn.Module, conv_name: str) -> None:
    """Fold the foldable BatchNorm that follows `owner.<conv_name>` in `seq` (dropouts between) into it."""
    conv = getattr(owner, conv_name)
    mods = list(seq.named_children())
    start = next((i + 1 for i, (_, m) in enumerate(mods) if m is conv), 0)
    for name, m in mods[start:]:
        if bn_affine(m) is not None:
            if can_fold_into(conv, before=False):
                setattr(owner, conv_name, fold_bn_after_conv(conv, m))
                delattr(seq, name)
            return
        if not is_eval_identity(m):
            return


# ----------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------

class _Slots:
    """Makes the modules of a placement's slots, keeping source norms where they fit."""

    def __init__(self, placement: Placement, source_norms: Dict[Tuple[object, str], nn.Module]):
        self.p = placement
        self.source_norms = source_norms
        self.act_layer = get_act_layer(placement.act)
        self.norm_has_act = placement.norm in NORMS_WITH_ACT
        self.instance_widths = set()  # widths where a grouped norm resolves to one channel per group

    def norm(self, channels: int, key: Optional[Tuple[object, str]] = None) -> nn.Module:
        src = self.source_norms.get(key) if key is not None else None
        if self.p.norm == 'batchnorm' and isinstance(src, nn.BatchNorm2d) and src.num_features == channels:
            if type(src) is nn.BatchNorm2d:
                return src
            # timm's BatchNormAct2d carries its own activation: keep its statistics in a plain BatchNorm2d
            bn = nn.BatchNorm2d(channels, eps=src.eps, momentum=src.momentum, affine=src.affine,
                                track_running_stats=src.track_running_stats)
            bn.load_state_dict({k: v for k, v in src.state_dict().items() if k in bn.state_dict()}, assign=True)
            return bn
        self._check_groups(channels)
        return create_norm(self.p.norm, channels, groups=self.p.groups, group_size=self.p.group_size)

    def norm_act_split(self, channels: int) -> Tuple[nn.Module, Optional[nn.Module]]:
        """A norm that must come without its nonlinearity, and that nonlinearity (FRN, EvoNorm; else None)."""
        self._check_groups(channels)
        return split_norm_act(self.p.norm, channels, groups=self.p.groups, group_size=self.p.group_size)

    def _check_groups(self, channels: int) -> None:
        # group_size=1 asks for InstanceNorm on purpose: only a resolved default or `groups` gets a warning
        if self.p.norm in GROUPED_NORMS and self.p.group_size is None and channels > 1 and \
                resolve_groups(channels, self.p.groups, None) == channels:
            self.instance_widths.add(channels)

    def act(self) -> Optional[nn.Module]:
        # FRN and EvoNorm bring their own nonlinearity; inplace would overwrite a residual input
        return None if self.norm_has_act else self.act_layer(inplace=False)

    def drop(self) -> nn.Module:
        return create_dropout(self.p.drop, drop_rate=self.p.drop_rate, beta=self.p.beta)

    def sequence(self, slots: Sequence[str], channels: int, key, with_drop: bool,
                 norm: Optional[nn.Module] = None) -> nn.Sequential:
        mods = OrderedDict()
        for slot in slots:
            if slot == 'norm':
                mods['norm'] = norm if norm is not None else self.norm(channels, key)
            elif slot == 'act':
                act = self.act()
                if act is not None:
                    mods['act'] = act
            elif slot == 'drop' and with_drop:
                mods['drop'] = self.drop()
        return Slot(mods)

    def unit(self, conv: nn.Conv2d, with_drop: bool, post_slots: Optional[Sequence[str]] = None,
             post_norm: Optional[nn.Module] = None) -> Unit:
        pre = self.sequence(self.p.pre_slots, conv.in_channels, (id(conv), 'pre'), with_drop)
        post_slots = self.p.post_slots if post_slots is None else post_slots
        post = self.sequence(post_slots, conv.out_channels, (id(conv), 'post'), with_drop, norm=post_norm)
        return Unit(pre, create_conv(self.p.conv, conv), post)


def _placed_skeleton(model: PlacedNet) -> Tuple[Skeleton, Dict]:
    """A PlacedNet's own weight layers and kept norms: `rewrite` of a timm_ic model to another placement."""
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


def build_placed_net(
        skeleton: Skeleton,
        placement: Union[Placement, str],
        num_classes: int = 1000,
        global_pool: str = 'avg',
        in_chans: int = 3,
        zero_init_last: bool = False,
        feature_input_size: Tuple[int, int] = (224, 224),
) -> PlacedNet:
    """Lay `placement` over `skeleton`. Weight layers (and the classifier, when its shape fits) are used as
    they are; norms are kept from `skeleton.source_norms` only where a BatchNorm of the same width sits on
    the same side of the same weight layer, and are new (weight 1, bias 0) everywhere else.
    `zero_init_last` starts each residual branch at zero, as timm does for training from scratch
    (`_zero_init_last`: the last norm, or the last conv where an activation follows that norm).
    """
    p = Placement.parse(placement)
    slots = _Slots(p, skeleton.source_norms)

    # stem: post-activation normalizes the stem conv; pre-activation leaves that to the first unit (no unit
    # sees two norms in a row), unless the family's own pre-activation design has a stem norm-act and the
    # units open with norm-act as that design's do (module docstring)
    stem = skeleton.stem
    stem_conv = _last_conv(stem)
    stem_key = (id(stem_conv), 'post')
    stem_slots = []
    if not p.preact:
        stem_slots = [s for s in p.post_slots if s != 'drop']
    elif skeleton.preact_stem_norm and [s for s in p.pre_slots if s != 'drop'] == ['norm', 'act']:
        stem_slots = ['norm', 'act']
    if stem_slots:
        with _located(p, 'stem'):
            stem_post = slots.sequence(stem_slots, stem_conv.out_channels, stem_key, with_drop=False)
        stem = nn.Sequential(OrderedDict([('conv', stem), *stem_post.named_children()]))
    else:
        stem = nn.Sequential(OrderedDict([('conv', stem)]))

    stages = []
    for si, stage_specs in enumerate(skeleton.stages):
        blocks = []
        for bi, spec in enumerate(stage_specs):
            with _located(p, f'stages.{si}.{bi}'):
                blocks.append(_block(spec, p, slots))
        stages.append(nn.Sequential(*blocks))

    num_features = _num_features(stages, stem_conv)
    if p.preact:  # the blocks end on a conv: normalize before the head
        with _located(p, 'final'):
            final = slots.sequence([s for s in p.pre_slots if s != 'drop'], num_features, ('final', 'pre'), False)
    else:
        final = nn.Identity()

    model = PlacedNet(stem, skeleton.stem_pool, stages, final, num_features, p,
                      num_classes=num_classes, global_pool=global_pool, in_chans=in_chans,
                      preact_stem_norm=skeleton.preact_stem_norm)
    if slots.instance_widths:
        warnings.warn(
            f'placement {p}: {p.norm} has one channel per group (InstanceNorm in all but name) on widths '
            f'{sorted(slots.instance_widths)}; Lubana et al. 2021 find its behaviour depends on the group size: '
            f'set group_size= (or groups=) in the placement to choose it', UserWarning, stacklevel=2)
    fc = skeleton.fc
    if fc is not None and isinstance(model.fc, nn.Linear) and fc.weight.shape == model.fc.weight.shape:
        model.fc = fc
    if zero_init_last:
        for m in model.modules():
            if isinstance(m, ResidualBlock):
                _zero_init_last(m)
    model.feature_info = _feature_info(model, in_chans, feature_input_size)
    return model


@contextlib.contextmanager
def _located(p: Placement, where: str):
    """Name the layer a setting conflicts with (e.g. groups that do not divide its width)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f'placement {p} cannot apply at {where}: {e}') from None


def _block(spec: BlockSpec, p: Placement, slots: _Slots) -> nn.Module:
    if isinstance(spec, ResidualSpec):
        return _residual_block(spec, p, slots)
    if isinstance(spec, DenseLayerSpec):
        n = len(spec.convs)
        return DenseLayer([slots.unit(c, p.drop_in_unit(i, n)) for i, c in enumerate(spec.convs)])
    if isinstance(spec, TransitionSpec):
        return Transition(slots.unit(spec.conv, p.has_drop and p.drop_units == 'all'), spec.pool)
    raise TypeError(f'unknown block spec {type(spec).__name__}')


def _residual_block(spec: ResidualSpec, p: Placement, slots: _Slots) -> ResidualBlock:
    n = len(spec.convs)
    units = []
    act = None
    for i, conv in enumerate(spec.convs):
        post_slots = post_norm = None
        if not p.preact and i == n - 1:
            # the last activation follows the sum (He et al. 2015); a norm with its own nonlinearity (FRN,
            # EvoNorm) gives it up there too, as in Lubana et al.'s reference block: norm before the sum,
            # its TLU / the EvoNorm after it
            post_slots = [s for s in p.post_slots if s != 'act']
            if slots.norm_has_act and 'norm' in post_slots:
                post_norm, act = slots.norm_act_split(conv.out_channels)
            elif 'act' in p.post_slots:
                act = slots.act()
        units.append(slots.unit(conv, p.drop_in_unit(i, n), post_slots, post_norm))
    downsample = None
    if spec.shortcut_conv is not None:
        conv = create_conv(p.conv, spec.shortcut_conv)
        mods = OrderedDict()
        if spec.shortcut_pool is not None:
            mods['pool'] = spec.shortcut_pool
        mods['conv'] = conv
        if not p.preact:  # the projection's norm, without a nonlinearity before the sum
            mods['norm'] = slots.norm(conv.out_channels, (id(spec.shortcut_conv), 'post')) \
                if not slots.norm_has_act else slots.norm_act_split(conv.out_channels)[0]
        downsample = nn.Sequential(mods)
    return ResidualBlock(units, downsample, spec.attn, spec.drop_path, act, preact=p.preact)


def _zero_init_last(block: ResidualBlock) -> None:
    """Start the residual branch at zero, as timm does for training from scratch, without killing its gradient.

    timm zeroes the last norm of a post-activation branch (conv-BN, nothing after it but the sum) and the last
    conv of a pre-activation one (ResNetV2's `zero_init_last`). A zero norm scale is only safe when nothing
    nonlinear follows it in the branch: a BN at zero followed by a ReLU (pre-activation norm-act-conv) outputs
    exactly 0, and ReLU's gradient at 0 is 0, so neither that BN nor anything before it in the branch would ever
    train. So: the last norm when only eval-identity layers (dropout, Uout) and the conv follow it (post, IC's
    act-norm-drop-conv), else the last conv's weight. A branch without norms is left as it is.
    """
    last = block.units[-1]
    layers = [*last.pre, last.conv, *last.post]
    norms = [i for i, m in enumerate(layers) if m is not last.conv and getattr(m, 'weight', None) is not None]
    if not norms:
        return
    after = layers[norms[-1] + 1:]
    if all(m is last.conv or is_eval_identity(m) for m in after):
        nn.init.zeros_(layers[norms[-1]].weight)
    else:
        nn.init.zeros_(last.conv.weight)


def _num_features(stages: Sequence[nn.Sequential], stem_conv: nn.Conv2d) -> int:
    """Channels leaving the last stage, from the weight layers alone (dense layers add theirs to the input)."""
    channels = stem_conv.out_channels
    for stage in stages:
        for block in stage:
            if isinstance(block, DenseLayer):
                channels += block.units[-1].conv.out_channels
            elif isinstance(block, Transition):
                channels = block.unit.conv.out_channels
            else:
                channels = block.units[-1].conv.out_channels
    return channels


@torch.no_grad()
def _feature_info(model: PlacedNet, in_chans: int, input_size: Tuple[int, int]) -> List[Dict]:
    """Channels and reductions of the stem and each stage, from a dry run on the meta device (no compute)."""
    # a copy whose tensors are meta stand-ins: cheap even for resnet152
    memo = {id(t): (nn.Parameter(torch.empty_like(t, device='meta'), t.requires_grad) if isinstance(t, nn.Parameter)
                    else torch.empty_like(t, device='meta'))
            for t in (*model.parameters(), *model.buffers())}
    meta = copy.deepcopy(model, memo).eval()
    x = torch.empty(1, in_chans, *input_size, device='meta')
    feats = meta.forward_intermediates(x, intermediates_only=True)
    names = ['stem'] + [f'stages.{i}' for i in range(len(model.stages))]
    return [dict(num_chs=f.shape[1], reduction=input_size[0] // f.shape[2], module=n) for f, n in zip(feats, names)]


# ----------------------------------------------------------------------------------------------------
# Entrypoint support
# ----------------------------------------------------------------------------------------------------

def conv_layer(in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
    """A bias-free conv with timm's ResNet init (He normal, fan-out): the weight layers of our skeletons."""
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
    return conv


def _build_from_skeleton(
        skeleton_fn: Callable[..., Skeleton],
        placement: Union[Placement, str],
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = 'avg',
        drop_rate: Optional[float] = None,
        zero_init_last: bool = True,
        feature_input_size: Tuple[int, int] = (224, 224),
        **skeleton_kwargs,
) -> PlacedNet:
    p = Placement.parse(placement)
    if drop_rate is not None:  # timm's drop_rate is the head's dropout rate
        p = p.replace(head_rate=drop_rate)
        if drop_rate > 0 and p.head == 'none':  # a head without dropout would ignore it: use timm's position
            p = p.replace(head='after_pool')
    return build_placed_net(
        skeleton_fn(in_chans=in_chans, **skeleton_kwargs), p, num_classes=num_classes, global_pool=global_pool,
        in_chans=in_chans, zero_init_last=zero_init_last, feature_input_size=feature_input_size)


def create_placed_model(
        variant: str,
        pretrained: bool,
        skeleton_fn: Callable[..., Skeleton],
        default_placement: Union[Placement, str],
        num_stages: int,
        feature_input_size: Tuple[int, int],
        **kwargs,
) -> PlacedNet:
    """timm's `build_model_with_cfg` for a PlacedNet (with the Hub's pretrained checks): cfg defaults,
    pretrained weights, features_only.

    `kwargs` are timm's usual ones (num_classes, in_chans, drop_rate, global_pool, features_only,
    out_indices, pretrained_cfg_overlay) plus `placement=` (a Placement or its string) and skeleton options.
    """
    placement = kwargs.pop('placement', None) or default_placement
    return build_model_with_checks(
        _build_from_skeleton, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_stages + 1))),
        skeleton_fn=skeleton_fn, placement=placement, feature_input_size=feature_input_size, **kwargs)
