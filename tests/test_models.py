"""Every registered model passes the checks timm's own tests/test_models.py applies to its family."""
import functools
from collections import OrderedDict
from pathlib import Path
from typing import Dict

import pytest
import timm
import torch
import torch.nn as nn

import timm_ic  # registers the models
from timm_ic.layers import Dropout, Uout
from timm_ic.models import PlacedNet
from timm_ic.models.placed import Slot
from timm_ic.placement import Placement

from conftest import DEEP, IMAGENET, MODELS, small_input  # shared with test_fold.py

MODELS_DEEP_SLOW = [pytest.param(m, marks=pytest.mark.slow) if m in DEEP else m for m in MODELS]


def test_zoo_is_registered_under_our_own_module_names():
    expected = {
        'ic_resnet18', 'ic_resnet34', 'ic_resnet50', 'ic_resnet101', 'ic_resnet152', 'ic_resnet110', 'ic_resnet164',
        'ic_wrn28_10', 'kim_resnet50', 'kim_preresnet110', 'kim_wrn28_10', 'uout_wrn28_10', 'uout_densenet121',
        'uout_densenet_bc100', 'cifar_resnet110', 'cifar_preresnet110', 'cifar_wrn28_10', 'cifar_densenet_bc100',
    }
    assert expected <= set(MODELS)
    assert not {'resnet', 'densenet'} & {timm.get_pretrained_cfg(m).architecture for m in MODELS}
    assert 'ic_resnet' in timm.list_modules()
    assert not set(MODELS) & set(timm.list_models(module=['resnet', 'densenet']))  # none under timm's own modules


def test_registering_a_timm_name_is_refused():
    from timm_ic.models._registry import register_model

    def resnet50():  # a plugin model that would shadow timm's
        pass
    resnet50.__module__ = 'timm_ic.models.ic_resnet'
    with pytest.raises(RuntimeError, match='already names a timm model'):
        register_model(resnet50)


@pytest.mark.parametrize('name', MODELS_DEEP_SLOW)
def test_model_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42)
    assert isinstance(model, PlacedNet)
    model.train()
    out = model(small_input(name))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:5]}'


@pytest.mark.parametrize('name', MODELS)
def test_model_default_cfg(name):
    """timm's cfg consistency checks, on the meta device: shapes without compute."""
    with torch.device('meta'):
        model = timm.create_model(name).eval()
        cfg = model.pretrained_cfg
        x = torch.empty(1, *cfg['input_size'])
        features = model.forward_features(x)
        assert tuple(features.shape[-2:]) == tuple(cfg['pool_size'])
        assert features.shape[1] == model.num_features == model.feature_info[-1]['num_chs']
        assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
        assert model(x).shape == (1, cfg['num_classes'])
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        unpooled = timm.create_model(name, num_classes=0, global_pool='').eval()(x)
        assert tuple(unpooled.shape[-2:]) == tuple(cfg['pool_size'])
        assert unpooled.shape[1] == model.num_features
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg['first_conv']], nn.Conv2d) and modules[cfg['first_conv']].in_channels == 3
    assert cfg['classifier'] in modules
    assert model.get_classifier(name_only=True) == cfg['classifier']
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        assert cfg[key]
    with pytest.raises(RuntimeError, match=rf'No pretrained weights for {name}\.untrained: this tag was never '
                                           'published'):  # an untrained tag has no weights, and says so
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize('name', MODELS)
def test_model_features_only(name):
    with torch.device('meta'):
        model = timm.create_model(name, features_only=True)
        x = small_input(name, 1)
        outs = model(x)
    info = model.feature_info
    assert len(outs) == len(info.channels())
    for out, chs, red in zip(outs, info.channels(), info.reduction()):
        assert out.shape[1] == chs and out.shape[-1] == x.shape[-1] // red


@pytest.mark.parametrize('name', MODELS_DEEP_SLOW)
def test_model_forward_intermediates(name):
    model = timm.create_model(name).eval()
    x = small_input(name, 1)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in intermediates] == [f['num_chs'] for f in model.feature_info]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[-1], intermediates[-1])


@pytest.mark.parametrize('name', MODELS)
def test_model_fx_trace_matches_eager(name):
    model = timm.create_model(name).eval()
    x = small_input(name, 1)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize('name', MODELS_DEEP_SLOW)
def test_model_torchscript(name):
    model = timm.create_model(name).eval()
    x = small_input(name, 1)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def _structure(model: nn.Module):
    """What dynamo's trace of a model depends on: its placement and the module kinds it is made of, each with
    its children's kinds. Repeats in a Sequential or ModuleList (a stage's blocks, a branch's units) collapse:
    depth adds no code path, so a bottleneck block traces like a basic one."""
    kinds = set()
    for m in model.modules():
        kids = [type(c).__name__ for c in m.children()]
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            kids = [k for i, k in enumerate(kids) if i == 0 or kids[i - 1] != k]
        kinds.add((type(m).__name__, tuple(kids)))
    return str(model.placement), frozenset(kinds)


@functools.lru_cache(maxsize=None)
def _same_structure_as() -> Dict[str, str]:
    """Each model's smallest model of the same structure (itself if none is smaller)."""
    smallest = {}
    with torch.device('meta'):
        models = {name: timm.create_model(name) for name in MODELS}
    for name, model in sorted(models.items(), key=lambda kv: sum(1 for _ in kv[1].modules())):
        smallest.setdefault(_structure(model), name)
    return {name: smallest[_structure(model)] for name, model in models.items()}


@pytest.mark.slow
@pytest.mark.parametrize('name', MODELS)
def test_model_dynamo_full_graph_matches_eager(name):
    # fullgraph=True fails on any graph break; the eager backend traces without codegen. Tracing takes seconds
    # per hundred modules (on meta as well), so a deeper model of an already traced structure is not traced again
    if _same_structure_as()[name] != name:
        pytest.skip(f'same structure as {_same_structure_as()[name]}, traced there')
    model = timm.create_model(name).eval()
    x = small_input(name, 1)
    torch._dynamo.reset()  # PlacedNet.forward is one code object: keep earlier models off its recompile limit
    try:
        compiled = torch.compile(model, backend='eager', fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_model_torch_compile():
    torch.manual_seed(0)
    model = timm.create_model('ic_resnet20', placement='ic:drop=uout,beta=0.1').eval()
    x = small_input('ic_resnet20')
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_placement_override_and_timm_kwargs():
    with torch.device('meta'):
        model = timm.create_model('ic_resnet50', placement='ic:drop=uout,beta=0.1', num_classes=5, in_chans=1,
                                  drop_rate=0.3)
    assert str(model.placement) == 'ic:drop=uout,beta=0.1,head_rate=0.3'
    assert any(isinstance(m, Uout) and m.beta == 0.1 for m in model.modules())
    assert not any(type(m) is nn.Dropout and m is not model.head_drop for m in model.modules())
    assert model.stem.conv.in_channels == 1 and model.fc.out_features == 5
    assert model.head_drop.p == 0.3


def test_drop_rate_adds_head_dropout_where_the_placement_has_none():
    # timm's drop_rate is classifier dropout: before_bn's head is 'none', so it moves to timm's position.
    # A Placement object, not only its string, is accepted as placement=
    placement = timm_ic.Placement.parse('before_bn')
    assert placement.head == 'none'
    model = timm.create_model('cifar_resnet20', placement=placement, drop_rate=0.3).train()
    assert str(model.placement) == 'before_bn:head=after_pool,head_rate=0.3'
    assert [m for m in model.modules() if type(m) is nn.Dropout and m.p == 0.3] == [model.head_drop]
    seen = {}
    model.head_drop.register_forward_hook(lambda m, args, out: seen.update(drop_in=args[0], drop_out=out))
    model.fc.register_forward_pre_hook(lambda m, args: seen.update(fc_in=args[0]))
    model(small_input('cifar_resnet20', 8))
    assert seen['fc_in'] is seen['drop_out'], 'the head dropout must feed the classifier'
    kept = seen['drop_out'] != 0
    assert (seen['drop_in'][~kept] != 0).any(), 'nothing was dropped'
    torch.testing.assert_close(seen['drop_out'][kept], seen['drop_in'][kept] / 0.7)
    # without drop_rate the preset stays as it is: no head dropout
    assert isinstance(timm.create_model('cifar_resnet20', placement=placement).head_drop, nn.Identity)


def test_unknown_placement_in_create_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown placement preset 'icc'"):
        timm.create_model('ic_resnet20', placement='icc')


def test_pretrained_cfg_overlay_loads_a_local_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    source = timm.create_model('ic_resnet20', num_classes=10)
    path = tmp_path / 'weights.safetensors'
    save_file(source.state_dict(), str(path))
    loaded = timm.create_model('ic_resnet20', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = small_input('ic_resnet20')
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source.eval()(x))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('cifar_preresnet20').train()
    x = small_input('cifar_preresnet20')
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # two forward passes must see the same statistics
    model(x).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize('name', [m for m in MODELS if m.startswith('uout_')])
def test_uout_models_use_beta_0_2(name):
    # the one Uout setting Li et al. 2019 report an accuracy result for (CIFAR-100, DenseNet and WRN)
    with torch.device('meta'):
        model = timm.create_model(name)
    betas = {m.beta for m in model.modules() if isinstance(m, Uout)}
    assert betas == {0.2} and model.placement.beta == 0.2


@pytest.mark.parametrize('make', [lambda: Uout(0.2), lambda: Dropout(0.1), lambda: Dropout(0.3)],
                         ids=['uout', 'dropout_positions', 'dropout_16_bit'])
def test_slot_runs_relu_then_dropout_as_one_op_without_keeping_the_relu_output(make):
    slot = Slot(OrderedDict(norm=nn.BatchNorm2d(8), act=nn.ReLU(), drop=make())).train()
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)

    def run():
        kept = {}  # storage -> bytes, what autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            torch.manual_seed(0)
            y = conv(slot(x))
        y.square().sum().backward()
        return y, x.grad.clone(), sum(kept.values())

    fused, fused_grad, fused_kept = run()
    calls = []
    hook = slot.act.register_forward_hook(lambda *args: calls.append(1))  # a hooked module runs as itself
    x.grad = None
    plain, plain_grad, plain_kept = run()
    assert calls == [1]
    assert torch.equal(fused, plain) and torch.equal(fused_grad, plain_grad)
    assert plain_kept - fused_kept == 4 * x.numel()  # the ReLU's float output
    hook.remove()
    traced = torch.fx.symbolic_trace(slot)  # an FX graph keeps every module's node, in training too
    assert [n.target for n in traced.graph.nodes if n.op == 'call_module'][:2] == ['norm', 'act']
    torch.manual_seed(0)
    assert torch.equal(conv(traced(x)), fused)


@pytest.mark.parametrize('norm', ['frn', 'evonorm_b0', 'evonorm_s0'])
def test_post_blocks_with_frn_or_evonorm_apply_their_nonlinearity_after_the_sum(norm):
    # Lubana et al.'s reference block: the norm before the sum without its nonlinearity, TLU / EvoNorm after it
    from timm.layers import FilterResponseNormTlu2d
    from timm_ic.models import ResidualBlock
    torch.manual_seed(0)
    model = timm.create_model('cifar_resnet20', placement=f'post:norm={norm},group_size=4'
                              if norm == 'evonorm_s0' else f'post:norm={norm}').eval()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    for block in blocks:
        last_norm = block.units[-1].post.norm
        short_norm = block.downsample.norm if block.downsample is not None else None
        if norm == 'frn':
            from timm_ic.layers import TLU
            assert isinstance(block.act, TLU)
            assert all(isinstance(n, FilterResponseNormTlu2d) and n.tau is None for n in (last_norm, short_norm) if n)
        else:
            assert type(block.act) is type(model.stem.norm) and block.act.apply_act  # the whole EvoNorm
            assert isinstance(last_norm, nn.Identity) and (short_norm is None or isinstance(short_norm, nn.Identity))
    # behaviour: the branch reaches the sum unthresholded; the threshold follows the sum
    if norm == 'frn':
        block, x = blocks[0], torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            block.act.tau.fill_(0.5)
            branch = block.units[1](block.units[0](x))
            assert (branch < 0.5).any()
            torch.testing.assert_close(block(x), torch.maximum(branch + x, torch.tensor(0.5)))


def test_grouped_norm_that_degenerates_to_instancenorm_warns_once_with_the_widths():
    with pytest.warns(UserWarning, match=r'one channel per group \(InstanceNorm.*widths \[16, 32\]') as record:
        timm.create_model('cifar_resnet20', placement='pre:norm=groupnorm')
    assert len([w for w in record if 'InstanceNorm' in str(w.message)]) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        timm.create_model('cifar_resnet20', placement='pre:norm=groupnorm,group_size=8')
        timm.create_model('cifar_resnet20', placement='pre:norm=groupnorm,group_size=1')  # asked for: no warning


# ------------------------------------------------------------------------------------------------------------
# one way to build a model from (name, placement, weights): timm_ic.models.create_model
# ------------------------------------------------------------------------------------------------------------

def test_create_model_builds_name_placement_and_weights(tmp_path):
    from safetensors.torch import save_file

    from timm_ic.models import PlacementError, UnknownModelError, WeightsError, create_model, takes_placement
    model = create_model('cifar_resnet20', placement='kim', num_classes=3, in_chans=1)
    assert str(model.placement) == str(Placement.parse('kim')) and model.num_classes == 3
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = create_model('cifar_resnet20', placement='kim', weights=path, num_classes=3, in_chans=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(WeightsError, match='does not fit the model'):  # loaded exactly: no classifier dropped
        create_model('cifar_resnet20', placement='kim', weights=path, num_classes=5, in_chans=1)
    with pytest.raises(WeightsError, match='only safetensors'):
        create_model('cifar_resnet20', weights=tmp_path / 'w.pth')
    assert takes_placement('ic_resnet20') and takes_placement('ic_resnet20.untrained')
    assert not takes_placement('resnet18') and not takes_placement('local-dir:x')
    with pytest.raises(PlacementError, match=r'timm_ic\.rewrite'):
        create_model('resnet18', placement='ic')
    with pytest.raises(UnknownModelError, match="Close matches: ic_resnet20"):
        create_model('ic_resnet2')


def test_no_module_builds_models_around_the_factory():
    """Outside timm_ic/models/, the package builds models with timm_ic.models.create_model only."""
    import ast
    root = Path(timm_ic.__file__).parent
    calls = []
    for path in root.rglob('*.py'):
        if path.parent.name == 'models':
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == 'create_model' and getattr(node.func.value, 'id', None) == 'timm':
                calls.append(f'{path.relative_to(root)}:{node.lineno}')
    assert calls == []


def _weights_without_gradient_after_one_step(model: nn.Module, x: torch.Tensor) -> list:
    """Names of the conv and linear weights whose gradient is exactly zero at the second step from
    initialisation (one plain SGD step first: a branch started at zero by its last conv opens after it)."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.arange(x.shape[0]) % model.num_classes
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        if _ == 0:
            opt.step()
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and (m.weight.grad is None or not m.weight.grad.any())]


@pytest.mark.parametrize('name', MODELS_DEEP_SLOW)
def test_every_weight_layer_trains_from_the_initialisation(name):
    # a residual branch whose last BN is zeroed and followed by a ReLU outputs exactly 0 with a zero gradient
    # (ReLU'(0) = 0): pre-activation branches never trained at all (issue 10's study found it: kim = pre)
    torch.manual_seed(0)
    model = timm.create_model(name)
    assert _weights_without_gradient_after_one_step(model, small_input(name, 4)) == []


@pytest.mark.parametrize('placement', ['pre', 'kim', 'kim:order=drop-norm-act-conv', 'kim:drop_units=all', 'ic',
                                       'post', 'before_bn', 'after_bn', 'pre:drop=uout,beta=0.2',
                                       'pre:norm=groupnorm,group_size=8', 'post:norm=frn', 'pre:norm=evonorm_b0'])
def test_every_weight_layer_trains_from_the_initialisation_under_each_placement(placement):
    torch.manual_seed(0)
    model = timm.create_model('cifar_resnet20', placement=placement, in_chans=1, num_classes=10)
    assert _weights_without_gradient_after_one_step(model, torch.randn(4, 1, 28, 28)) == []
