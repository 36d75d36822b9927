"""Folding eval BatchNorm into the weight layers (issue 13, inference): exact, borders included."""
import io

import pytest
import timm
import torch
import torch.nn as nn
from timm.utils import reparameterize_model
from torch.fx import GraphModule, Tracer

import timm_ic  # registers the models
from timm_ic.layers import BiasMapConv2d, ClampMin2d, Dropout, Uout, fold_bn_after_conv, fold_bn_after_relu, \
    fold_bn_before_conv, is_eval_identity
from timm_ic.models import ResidualBlock

from conftest import DEEP, MODELS, small_input

# the fold test runs a float64 forward of each model twice per size: the deep ones (and the ImageNet ones
# at 64 px) in the slow tier
SLOW = DEEP | {'cifar_preresnet110', 'cifar_preresnet56', 'cifar_resnet56', 'ic_resnet56', 'ic_resnet34',
               'ic_resnet50', 'kim_resnet50', 'uout_densenet121', 'cifar_wrn28_10', 'ic_wrn28_10', 'kim_wrn28_10',
               'uout_wrn28_10', 'cifar_wrn40_4'}
MODELS_SLOW = [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in MODELS]

_PASS_THROUGH = (nn.Identity, nn.Dropout, Dropout, Uout, nn.AdaptiveAvgPool2d, nn.Flatten)
_WEIGHT = (nn.Conv2d, nn.Linear)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 3 - 1.5)  # negative scales too
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)


def _foldable_bns(model: nn.Module):
    """BatchNorms next to a weight layer, found on the traced graph (independently of the fold code): the
    input is a conv that feeds only it, or every use reaches a weight layer through dropouts and global
    average pooling only."""
    class LeafTracer(Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (BiasMapConv2d, Dropout, Uout)) or super().is_leaf_module(m, qualname)

    gm = GraphModule(model, LeafTracer().trace(model))
    mods = dict(gm.named_modules())

    def mod(n):
        return mods.get(n.target) if n.op == 'call_module' else None

    def reaches_weight(n) -> bool:
        m = mod(n)
        if isinstance(m, _WEIGHT):
            return True
        return isinstance(m, _PASS_THROUGH) and len(n.users) > 0 and all(reaches_weight(u) for u in n.users)

    found = []
    for n in gm.graph.nodes:
        if type(mod(n)) is not nn.BatchNorm2d:
            continue
        src = n.args[0]
        while isinstance(mod(src), _PASS_THROUGH) and len(src.users) == 1:
            src = src.args[0]
        after_weight = isinstance(mod(src), nn.Conv2d) and len(src.users) == 1
        if after_weight or all(reaches_weight(u) for u in n.users):
            found.append(n.target)
    return found


@pytest.mark.parametrize('name', MODELS_SLOW)
def test_folded_model_equals_the_unfolded_one_and_keeps_no_foldable_bn(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval().double()
    _randomize_bn(model)
    bn_before = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    folded = reparameterize_model(model).fuse()
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == bn_before, 'the original is untouched'
    assert _foldable_bns(folded) == []
    x = small_input(name)
    for size in (x.shape[-1], x.shape[-1] + 8):  # a second size: a new bias map, other borders
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            y, yf = model(x), folded(x)
        assert torch.allclose(yf, y, rtol=1e-5, atol=1e-5 * y.abs().max().item()), name


def test_ic_and_post_placements_keep_no_batchnorm_and_preact_keeps_only_the_norms_after_a_sum():
    # IC (act-norm-drop-conv) and post (conv-norm-act) fold every BN
    for name in ('ic_resnet20', 'cifar_resnet20', 'ic_resnet18'):
        folded = timm.create_model(name).eval().fuse()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), name
    # pre (norm-act-conv): a ReLU between each norm and the conv after it; the norms inside a block fold into
    # the conv before them, those opening a block (after the residual sum) and the final one stay
    pre = timm.create_model('cifar_preresnet20').eval().fuse()
    left = [n for n, m in pre.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left and all(n.endswith('units.0.pre.norm') or n == 'final.norm' for n in left), left
    assert len(left) == sum(len(s) for s in pre.stages) + 1


def test_reparameterize_model_folds_the_blocks_and_fuse_the_head():
    model = timm.create_model('ic_resnet20').eval()
    _randomize_bn(model)
    blocks = reparameterize_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in blocks.stages.modules())
    assert isinstance(blocks.final.norm, nn.BatchNorm2d)  # the root's own children: only its fuse folds them
    assert 'norm' not in blocks.fuse().final._modules


def test_fold_before_a_padded_conv_is_exact_on_the_border_even_for_a_zero_bn_scale():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval().double()
    _randomize_bn(bn)
    with torch.no_grad():
        bn.weight[0] = 0.0  # zero-init last BN: a shift b / a would divide by zero
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True).double()
    folded = fold_bn_before_conv(bn, conv).eval()
    assert isinstance(folded, BiasMapConv2d)
    for size in (7, 8):
        x = torch.randn(3, 4, size, size, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), conv(bn(x)), rtol=1e-12, atol=1e-12)
    # a BN after the folded conv folds on top (a placement with norms on both sides)
    bn2 = nn.BatchNorm2d(6).eval().double()
    _randomize_bn(bn2, seed=1)
    both = fold_bn_after_conv(folded, bn2).eval()
    with torch.no_grad():
        torch.testing.assert_close(both(x), bn2(conv(bn(x))), rtol=1e-12, atol=1e-12)


def test_a_folded_padded_conv_trains_with_the_gradient_of_the_unfolded_pair():
    # the bias map is added in place onto the conv's output: autograd must still see conv(bn(x))
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval().double()
    _randomize_bn(bn)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    folded = fold_bn_before_conv(bn, conv).train()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    grad_folded, = torch.autograd.grad(folded(x), x, g)
    grad_pair, = torch.autograd.grad(conv(bn(x)), x, g)
    torch.testing.assert_close(grad_folded, grad_pair, rtol=1e-12, atol=1e-12)


def test_relu_then_bn_between_two_convs_folds_into_the_first_exactly_for_every_sign_of_the_scale():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval().double()
    _randomize_bn(bn)  # scales of both signs
    with torch.no_grad():
        bn.weight[0] = 0.0
        bn.weight[1] = -0.0
    assert (bn.weight < 0).any() and (bn.weight > 0).any()
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double().eval()
    after = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, bias=True).double().eval()
    conv2, floor, after2 = fold_bn_after_relu(conv, bn, after)
    assert type(conv2) is nn.Conv2d and type(after2) is nn.Conv2d  # no bias map: the border is exact as is
    assert not any(m.training for m in (conv2, after2))  # as the modules they replace
    for size in (7, 8):
        x = torch.randn(3, 4, size, size, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(after2(floor(conv2(x))), after(bn(torch.relu(conv(x)))), rtol=1e-12,
                                       atol=1e-12)


def test_fused_ic_blocks_keep_a_bias_map_only_in_their_first_unit_and_run_eval_modules():
    model = timm.create_model('ic_resnet20').eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    model.fuse()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert all(isinstance(b.units[0].conv, BiasMapConv2d) for b in blocks)
    assert not any(isinstance(u.conv, BiasMapConv2d) for b in blocks for u in b.units[1:])
    assert not any(m.training for m in model.modules())  # the folded modules too
    maps = []  # an eval bias map is computed once per input size, then cached
    for m in model.modules():
        if isinstance(m, BiasMapConv2d):
            m.bias_map = lambda x, f=m.bias_map: maps.append(1) or f(x)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert len(maps) == len(blocks)


def test_loading_weights_into_a_fused_model_drops_its_cached_bias_maps():
    x = torch.randn(2, 3, 32, 32)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model('ic_resnet20').eval()
        _randomize_bn(model, seed)
        with torch.no_grad():
            models.append((model(x), model.fuse()))
    (_, first), (expected, second) = models
    with torch.no_grad():
        first(x)  # caches the first model's maps
        first.load_state_dict(second.state_dict())
        torch.testing.assert_close(first(x), expected, rtol=1e-4, atol=1e-4)
    conv = next(m for m in first.modules() if isinstance(m, BiasMapConv2d))
    with torch.no_grad():
        for size in range(8, 8 + 2 * conv.max_cached_maps):
            conv(torch.randn(1, conv.in_channels, size, size))
    assert len(conv._maps) == conv.max_cached_maps  # bounded, whatever sizes come


def test_clamp_min_keeps_the_input_dtype():
    floor = ClampMin2d(torch.randn(4))
    x = torch.randn(2, 4, 3, 3).bfloat16()
    for inplace in (False, True):
        floor.inplace = inplace
        y = floor(x.clone())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, torch.maximum(x, floor.floor.bfloat16()))


def test_fold_before_an_unpadded_conv_is_a_plain_conv():
    bn = nn.BatchNorm2d(4).eval()
    _randomize_bn(bn)
    conv = nn.Conv2d(4, 5, 1, bias=False)
    folded = fold_bn_before_conv(bn, conv)
    assert type(folded) is nn.Conv2d
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), conv(bn(x)), rtol=1e-5, atol=1e-5)


def test_training_mode_bn_and_other_norms_are_left_alone():
    model = timm.create_model('ic_resnet20', placement='ic:norm=groupnorm,groups=4').eval()
    norms = [type(m) for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and [type(m) for m in model.fuse().modules() if isinstance(m, nn.GroupNorm)] == norms


@pytest.mark.parametrize('name', ['ic_resnet20', pytest.param('ic_resnet50', marks=pytest.mark.slow)])
def test_onnx_export_of_a_folded_model_runs_in_onnxruntime_and_matches(name):
    # torch's default (dynamo) exporter needs onnx and onnxscript; onnxruntime runs the result: test dependencies
    import onnx
    import onnxruntime as ort
    model = timm.create_model(name).eval()
    _randomize_bn(model)
    folded = reparameterize_model(model).fuse()
    x = small_input(name, batch=1)
    buf = io.BytesIO()
    torch.onnx.export(folded, (x,), input_names=['x'], output_names=['y'], dynamo=True).save(buf)
    onnx.checker.check_model(buf.getvalue())
    ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node]
    assert 'BatchNormalization' not in ops and 'Conv' in ops
    (y,) = ort.InferenceSession(buf.getvalue(), providers=['CPUExecutionProvider']).run(None, {'x': x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['ic_resnet20', 'cifar_preresnet20'])
def test_inference_sums_into_the_branch_and_leaves_the_input_and_output_as_with_grad(name):
    # without grad a residual block adds the shortcut into its branch's output in place: the same result as
    # the autograd path, and no block writes into a tensor it was given
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    inputs = []
    for block in model.modules():
        if isinstance(block, ResidualBlock):
            block.register_forward_pre_hook(lambda m, args: inputs.append((args[0], args[0].clone())))
    with torch.no_grad():
        y = model(x)
    assert inputs and all(torch.equal(seen, copy) for seen, copy in inputs)
    torch.testing.assert_close(y, model(x).detach(), rtol=0, atol=0)
    with torch.no_grad():  # the in-place choice reads tensor attributes: FX must still trace without grad
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.fuse()(x), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('placement', ['ic', 'pre', 'kim', 'kim:order=drop-norm-act-conv', 'pre:drop=uout,beta=0.2'])
def test_fusing_runs_only_activations_in_place_and_never_a_block_input(placement):
    # after the fold a later unit's activation takes the previous conv's output alone and may run in place; a
    # dropout keeps the flag it was built with, and the first unit (its input is the shortcut's too) is untouched
    model = timm.create_model('cifar_resnet20', placement=placement).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.fuse()
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert not any(getattr(m, 'inplace', False) for m in model.modules() if is_eval_identity(m))
    for block in model.modules():
        if isinstance(block, ResidualBlock):
            assert not any(getattr(m, 'inplace', False) for m in block.units[0].pre.modules())
