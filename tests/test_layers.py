"""Layers: the papers' formulas measured on synthetic data, plus modes, dtypes, compile and bad arguments."""
import importlib
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from timm_ic.layers import (
    NORM_KINDS, Dropout, ICLayer, Uout, VarianceNorm2d, create_conv, create_dropout, create_norm, set_dropout_redraw,
)

dropout_mod = importlib.import_module('timm_ic.layers.dropout')  # the module, whatever names the package exports

N = 2_000_000  # elements: the variance of a variance estimate is ~2/N, far inside a 1% tolerance


def variance_shift(module: nn.Module, x: torch.Tensor) -> float:
    """Var_test / Var_train of a dropout-like module (Li et al. 2019), on the same input."""
    module.train()
    var_train = module(x).var().item()
    module.eval()
    var_test = module(x).var().item()
    return var_test / var_train


@pytest.mark.parametrize('beta', [0.1, 0.2, 0.3, 0.5])
def test_uout_variance_shift_matches_theory(beta):
    torch.manual_seed(0)
    x = torch.randn(N)
    expected = 3 / (3 + beta ** 2)
    assert variance_shift(Uout(beta), x) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize('drop_rate', [0.1, 0.3, 0.5])
def test_bernoulli_variance_shift_is_p_keep_for_zero_mean_input(drop_rate):
    torch.manual_seed(0)
    x = torch.randn(N)
    assert variance_shift(create_dropout('dropout', drop_rate), x) == pytest.approx(1 - drop_rate, rel=0.01)


def correlated_units(n: int, rho: float, mean: float) -> torch.Tensor:
    """n samples of two unit-variance units with correlation rho and the given mean, as (n, 2, 1, 1)."""
    z = torch.randn(n, 2)
    u = torch.stack([z[:, 0], rho * z[:, 0] + (1 - rho ** 2) ** 0.5 * z[:, 1]], dim=1)
    return (u + mean).view(n, 2, 1, 1)


def correlation(y: torch.Tensor) -> float:
    return torch.corrcoef(y.view(y.shape[0], 2).T)[0, 1].item()


@pytest.mark.parametrize('drop_rate', [0.05, 0.1, 0.5])
def test_bn_then_dropout_scales_correlation_by_p_keep(drop_rate):
    torch.manual_seed(0)
    rho, keep = 0.6, 1 - drop_rate
    x = correlated_units(400_000, rho, mean=2.0)
    ic = ICLayer(2, drop='dropout', drop_rate=drop_rate).train()
    with torch.no_grad():
        assert correlation(ic(x)) == pytest.approx(rho * keep, abs=0.01)


def test_dropout_on_non_centred_input_does_not_scale_correlation_by_p_keep():
    # the reason BN comes first: with mean 2 and keep 0.5 the correlation falls to ~0.10, not 0.30
    torch.manual_seed(0)
    rho, keep = 0.6, 0.5
    x = correlated_units(400_000, rho, mean=2.0)
    with torch.no_grad():
        measured = correlation(create_dropout('dropout', 1 - keep).train()(x))
    assert abs(measured - rho * keep) > 0.1
    assert measured == pytest.approx(0.10, abs=0.02)


ALL_LAYERS = {
    'uout': lambda: Uout(0.3),
    'dropout': lambda: create_dropout('dropout', 0.3),
    'dropout_low_rate': lambda: create_dropout('dropout', 0.05),
    'ic': lambda: ICLayer(8, drop='dropout', drop_rate=0.2),
    'ic_uout': lambda: ICLayer(8, drop='uout', beta=0.2),
    **{f'norm_{name}': (lambda name=name: create_norm(name, 8)) for name in NORM_KINDS},
    'ws_conv': lambda: create_conv('ws', nn.Conv2d(8, 8, 3, padding=1)),
}


@pytest.mark.parametrize('name', sorted(ALL_LAYERS))
def test_layer_train_eval_grad_and_bf16(name):
    torch.manual_seed(0)
    layer = ALL_LAYERS[name]()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    layer.train()
    y = layer(x)
    y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x)), 'eval mode must be deterministic'
        with torch.autocast('cpu', dtype=torch.bfloat16):
            yb = layer(x)
        assert torch.isfinite(yb).all() and yb.shape == x.shape


@pytest.mark.parametrize('module', [Uout(0.5), create_dropout('dropout', 0.5)], ids=['uout', 'dropout'])
def test_dropouts_are_identity_in_eval(module):
    x = torch.randn(16, 8)
    assert torch.equal(module.eval()(x), x)
    assert not torch.equal(module.train()(x), x)


def test_ic_layer_eval_is_its_norm_eval():
    ic = ICLayer(8, drop='uout', beta=0.5)
    ic.train()(torch.randn(32, 8, 4, 4) * 3 + 1)  # move the running statistics
    ic.eval()
    x = torch.randn(4, 8, 4, 4)
    assert torch.equal(ic(x), ic.norm(x))


def test_uout_noise_is_bounded_by_beta():
    x = torch.ones(100_000)
    y = Uout(0.2).train()(x)
    assert y.min() >= 0.8 and y.max() <= 1.2 and y.std() > 0.1


def test_variance_norm_divides_by_batch_std_without_centring():
    vn = VarianceNorm2d(3).train()
    x = torch.randn(64, 3, 5, 5) * 4 + 10
    y = vn(x)
    expected = x / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + vn.eps).view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    assert y.mean() > 1  # the mean was not subtracted
    vn.eval()
    torch.testing.assert_close(vn.running_var, 0.9 + 0.1 * x.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)


def test_ws_conv_keeps_weights():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    ws = create_conv('ws', conv)
    assert ws.weight is conv.weight and ws.bias is conv.bias
    w = ws.weight.detach().flatten(1)
    # the effective kernel is standardized per output channel
    x = torch.randn(2, 4, 5, 5)
    assert ws(x).shape == conv(x).shape and not torch.allclose(ws(x), conv(x))
    assert w.shape == (8, 36)
    # timm's ScaledStdConv2d formula: per output channel zero mean and standard deviation gamma / sqrt(fan-in),
    # gamma the gain that keeps ReLU's output variance (NF-ResNets, 1.7139), times the learned gain (1 at init)
    from timm.models.nfnet import _nonlin_gamma
    gamma = _nonlin_gamma['relu']
    assert ws.scale == pytest.approx(gamma / 36 ** 0.5) and torch.equal(ws.gain.detach(), torch.ones(8, 1, 1, 1))
    standardized = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + ws.eps)
    effective = standardized * gamma / 36 ** 0.5
    assert torch.allclose(effective.mean(1), torch.zeros(8), atol=1e-6)
    assert torch.allclose(effective.std(1, unbiased=False), torch.full((8,), gamma / 6), rtol=1e-4)
    with torch.no_grad():
        expected = nn.functional.conv2d(x, effective.view_as(conv.weight), conv.bias, padding=1)
        assert torch.allclose(ws(x), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(ALL_LAYERS))
def test_layers_compile(name):
    torch.manual_seed(0)
    layer = ALL_LAYERS[name]().eval()
    x = torch.randn(4, 8, 6, 6)
    compiled = torch.compile(layer, backend='inductor')
    torch.testing.assert_close(compiled(x), layer(x))
    layer.train()
    assert compiled(x).shape == x.shape


@pytest.mark.parametrize('call, message', [
    (lambda: Uout(-0.1), 'beta must be >= 0'),
    (lambda: create_dropout('dropout', 1.0), 'drop_rate must be in [0, 1)'),
    (lambda: create_dropout('dropout', -0.1), 'drop_rate must be in [0, 1)'),
    (lambda: create_dropout('gaussian', 0.1), "valid: ['dropout', 'uout', 'none']"),
    (lambda: create_norm('batchnrom', 8), "'batchnorm'"),
    (lambda: create_norm('groupnorm', 24, groups=5), 'valid: [1, 2, 3, 4, 6, 8, 12, 24]'),
    (lambda: create_norm('groupnorm', 24, group_size=5), 'does not divide 24'),
    (lambda: create_norm('batchnorm', 24, groups=4), 'grouped norms'),
    (lambda: create_conv('deformable', nn.Conv2d(2, 2, 1)), "valid: ['conv', 'ws']"),
])
def test_bad_arguments_name_the_valid_choices(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


def test_grouped_norms_default_to_a_divisor_of_the_width():
    assert create_norm('groupnorm', 64).num_groups == 32
    assert create_norm('groupnorm', 36).num_groups == 18
    assert create_norm('groupnorm', 24, group_size=8).num_groups == 3
    assert create_norm('instancenorm', 12).num_groups == 12
    assert create_norm('layernorm', 12).num_groups == 1


def test_uout_default_beta_is_the_papers_reported_setting():
    # 0.2 is the only Uout setting with an accuracy result in Li et al. 2019 (papers.md)
    assert Uout().beta == 0.2


def test_split_norm_act_separates_frn_and_evonorm_nonlinearity():
    from timm.layers import EvoNorm2dB0, FilterResponseNormTlu2d
    from timm_ic.layers import TLU, split_norm_act
    norm, act = split_norm_act('frn', 8)
    assert isinstance(norm, FilterResponseNormTlu2d) and norm.tau is None and isinstance(act, TLU)
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        act.tau.fill_(0.3)
        torch.testing.assert_close(act(x), torch.maximum(x, torch.tensor(0.3)))
        full = create_norm('frn', 8)
        full.tau.fill_(0.3)
        torch.testing.assert_close(act(norm(x)), full(x))  # the two parts make the whole
    norm, act = split_norm_act('evonorm_b0', 8)  # no norm before, the whole EvoNorm after (Lubana et al.)
    assert isinstance(norm, nn.Identity) and isinstance(act, EvoNorm2dB0) and act.apply_act
    norm, act = split_norm_act('batchnorm', 8)
    assert isinstance(norm, nn.BatchNorm2d) and act is None


# The CPU fast paths of Dropout and Uout (timm_ic.layers.dropout): drop positions drawn as geometric gaps at rates
# up to 1/8; 16-bit draws from torch's generator and a 1-byte mask above

def test_random_int16_draws_all_64_bits_of_each_word():
    # random_() with its default range leaves an int64's sign bit 0: the top 16-bit piece would never be negative
    torch.manual_seed(0)
    lanes = dropout_mod.random_int16(torch.empty(4_000_000)).view(-1, 4)
    assert lanes.dtype == torch.int16
    negative = (lanes < 0).double().mean(0)
    torch.testing.assert_close(negative, torch.full((4,), 0.5, dtype=torch.float64), atol=0.003, rtol=0)
    # the lowest bit and a middle one of every lane are fair coins too
    for bit in (0, 7):
        ones = ((lanes >> bit) & 1).double().mean(0)
        torch.testing.assert_close(ones, torch.full((4,), 0.5, dtype=torch.float64), atol=0.003, rtol=0)


@pytest.mark.parametrize('p', [0.13, 0.3, 0.5, 0.9])
def test_dropout_drops_each_16_bit_value_below_its_threshold_exactly(p, monkeypatch):
    # the exact-granularity argument: fed every one of the 65536 16-bit values once, the layer drops exactly
    # round(p * 65536) of them, so with uniform draws P(drop) = round(p * 65536) / 65536, within 2^-17 of p
    every = torch.arange(-32768, 32768, dtype=torch.int16)
    monkeypatch.setattr(dropout_mod, 'random_int16', lambda like, generator=None: every.view(like.shape))
    levels = dropout_mod.drop_levels(p)
    assert abs(levels / 65536 - p) <= 2 ** -17
    y = Dropout(p).train()(torch.ones(65536))
    assert int((y == 0).sum()) == levels
    # kept units are scaled by 1 / P(keep) of the rounded rate, so E[y] = x exactly
    torch.testing.assert_close(y[y != 0], torch.full((65536 - levels,), 65536 / (65536 - levels)))
    assert float(y.double().mean()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize('p', [0.001, 0.05, 0.125, 0.2, 0.5])
def test_dropout_rate_on_a_large_tensor(p):
    torch.manual_seed(0)
    n = 4_000_000
    dropped = float((Dropout(p).train()(torch.ones(n)) == 0).double().mean())
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # 5 standard errors: ~1e-4 at p = 0.05


@pytest.mark.parametrize('p', [1e-4, 0.05, 0.125])
def test_geometric_gaps_invert_every_32_bit_draw_exactly(p):
    # steps - 1 >= g exactly for the draws u = j / 2^32 with j <= floor((1 - p)^g * 2^32): P(g or more units kept
    # before a drop) = floor((1 - p)^g * 2^32) / 2^32, within 2^-32 of the geometric law, for every g up to the
    # largest step a draw can give (u = 2^-32)
    largest = int(math.floor(math.log(2.0 ** -32) / math.log1p(-p)))
    for g in sorted({1, 2, 3, 10, largest // 2, largest - 1, largest}):
        j = math.floor((1 - p) ** g * 2 ** 32)
        bits = torch.tensor([j, j + 1], dtype=torch.int64).sub_(2 ** 31 + 1).to(torch.int32)  # u = j, j + 1
        kept = dropout_mod.geometric_steps(bits, p, longest=2 ** 62) - 1
        assert int(kept[0]) >= g > int(kept[1]), (g, kept)
    ends = torch.tensor([-2 ** 31, 2 ** 31 - 1], dtype=torch.int32)  # u = 2^-32 and u = 1
    assert dropout_mod.geometric_steps(ends, p, longest=2 ** 62).tolist() == [largest + 1, 1]
    assert dropout_mod.geometric_steps(ends, p, longest=5).tolist() == [5, 1]


@pytest.mark.parametrize('p', [1e-19, 5e-324])
def test_rates_too_small_to_drop_anything_leave_every_unit(p):
    # a step of 1 / p units would pass int64: steps are cut at the end of the tensor
    torch.manual_seed(0)
    x = torch.randn(1000, requires_grad=True)
    y = Dropout(p).train()(x)
    torch.testing.assert_close(y, x * (1 / (1 - p)))
    assert Dropout(0.05).train()(torch.ones(0)).shape == (0,)
    with pytest.raises(ValueError, match='dropout probability'):  # F.dropout's own message
        dropout_mod.dropout(torch.ones(4), -0.05)


@pytest.mark.parametrize('sigmas', [6.0, -3.0], ids=['one_draw', 'draws_again'])
def test_drop_positions_are_independent_bernoulli_units(sigmas):
    # -3 sigmas draws too few gaps on purpose, so positions continue across several draws
    torch.manual_seed(0)
    n, p = 2_000_000, 0.1
    positions = dropout_mod.drop_positions(n, p, torch.device('cpu'), sigmas=sigmas)
    assert positions.dtype == torch.int64 and bool((positions.diff() > 0).all())
    assert int(positions[0]) >= 0 and int(positions[-1]) < n
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    se = (p * (1 - p) / n) ** 0.5
    assert abs(float(dropped.double().mean()) - p) < 5 * se
    for lag in (1, 2, 7):  # neighbours drop together with probability p^2: no correlation between units
        both = float((dropped[:-lag] & dropped[lag:]).double().mean())
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    # the drop counts of 100-unit windows have the binomial variance n p (1 - p), as independent units do
    counts = dropped.view(-1, 100).double().sum(1)
    assert float(counts.var()) == pytest.approx(100 * p * (1 - p), rel=0.03)


@pytest.mark.parametrize('sigmas', [6.0, -50.0], ids=['one_draw', 'one_gap_per_draw'])
def test_every_unit_of_a_small_tensor_drops_at_the_rate(sigmas):
    # the first and last units too: the positions start at unit 0 and stop before n; at -50 sigmas every gap is
    # a draw of its own, so each continues where the last stopped
    torch.manual_seed(0)
    calls, n, p = 20_000, 8, 0.3
    dropped = torch.zeros(calls, n)
    for i in range(calls):
        positions = dropout_mod.drop_positions(n, p, torch.device('cpu'), sigmas=sigmas)
        assert bool((positions.diff() > 0).all())
        dropped[i, positions] = 1
    torch.testing.assert_close(dropped.mean(0), torch.full((n,), p), atol=5 * (p * (1 - p) / calls) ** 0.5, rtol=0)
    both = (dropped[:, :-1] * dropped[:, 1:]).mean(0)  # neighbours independent
    torch.testing.assert_close(both, torch.full((n - 1,), p * p), atol=5 * (p * p / calls) ** 0.5, rtol=0)


@pytest.mark.parametrize('make', [lambda: Dropout(0.3), lambda: Dropout(0.05), lambda: Uout(0.3)],
                         ids=['dropout', 'dropout_low_rate', 'uout'])
def test_same_seed_or_restored_rng_state_gives_the_same_noise(make):
    layer = make().train()
    x = torch.randn(8, 16, 7, 7)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    state = torch.get_rng_state()  # exact resume restores the generator state
    after = layer(x)
    assert not torch.equal(after, first)
    torch.set_rng_state(state)
    assert torch.equal(layer(x), after)


@pytest.mark.parametrize('p, channels_last', [(0.3, False), (0.05, False), (0.05, True)])
def test_dropout_forward_and_gradient_are_mask_times_scale(p, channels_last):
    torch.manual_seed(0)
    x = torch.rand(16, 8, 5, 5) + 0.5  # no zeros: a zero output means a dropped unit
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = Dropout(p).train()(x)
    keep = y != 0
    assert abs(keep.float().mean() - (1 - p)) < 0.05
    # the rate as asked at rates up to 1/8, rounded to a multiple of 1/65536 above
    scale = 1 / (1 - p) if p <= 1 / 8 else 65536 / (65536 - dropout_mod.drop_levels(p))
    torch.testing.assert_close(y, x.detach() * keep * scale)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep * scale)


def test_uout_noise_is_the_65536_midpoints_and_its_gradient_is_the_noise():
    torch.manual_seed(0)
    beta = 0.3
    x = (torch.rand(400_000) + 0.5).double().requires_grad_()
    y = Uout(beta).train()(x)
    noise = (y / x).detach()
    steps = (noise - 1) / beta * 32768 - 0.5  # k in [-32768, 32767] for noise 1 + beta * (k + 1/2) / 32768
    torch.testing.assert_close(steps, steps.round(), atol=1e-6, rtol=0)
    assert steps.min() >= -32768 and steps.max() <= 32767
    assert float(noise.mean()) == pytest.approx(1.0, abs=3 * beta / (3 * 400_000) ** 0.5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * noise)


def saved_for_backward(fn, x: torch.Tensor):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x)
    return [(t.dtype, t.element_size() * t.numel()) for t in saved if t is not x]


def test_cpu_dropouts_keep_a_small_mask_for_backward():
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    # Bernoulli: one byte per element, not the float mask F.dropout keeps; Uout: the 2-byte draws
    assert saved_for_backward(Dropout(0.2).train(), x) == [(torch.bool, x.numel())]
    assert saved_for_backward(Uout(0.2).train(), x) == [(torch.int16, 2 * x.numel())]
    # rates up to 1/8: the drops' 8-byte indices, at most one byte per element
    torch.manual_seed(0)
    x = torch.randn(64, 16, 8, 8, requires_grad=True)
    (dtype, size), = saved_for_backward(Dropout(0.05).train(), x)
    assert dtype == torch.int64 and 0.3 * x.numel() < size < 0.5 * x.numel()


@pytest.mark.parametrize('make', [
    lambda: Uout(0.3), lambda: Uout(0.999), lambda: Uout(1.5), lambda: Dropout(0.05), lambda: Dropout(0.3),
    lambda: Dropout(1 - 1e-4),
], ids=['uout', 'uout_near_1', 'uout_beta_1_or_more_unfused', 'dropout_positions', 'dropout_16_bit',
        'dropout_torch'])
def test_dropout_after_relu_is_one_op_with_the_values_of_the_two(make):
    layer = make().train()
    x = torch.randn(4, 8, 6, 6)
    # a third of the units special, so that some of each are dropped (not subnormals: x * u can round to 0 where
    # x does not, and the gradient is masked by the output, as `_Multiply` says)
    special = torch.tensor([0.0, -0.0, float('nan'), -1e-30, float('inf'), -float('inf')])
    x.view(-1)[:360] = special.repeat(60)
    fused_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    torch.manual_seed(0)
    fused = layer.forward_after_relu(fused_x)
    fused.backward(g)
    torch.manual_seed(0)
    plain = layer(torch.relu(plain_x))
    plain.backward(g)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused_x.grad, plain_x.grad, rtol=0, atol=0, equal_nan=True)
    layer.eval()
    torch.testing.assert_close(layer.forward_after_relu(x), torch.relu(x), rtol=0, atol=0, equal_nan=True)


def test_uout_after_relu_with_a_negative_beta_takes_the_two_ops():
    # uout() itself does not check beta: a negative one makes negative noise, which does not commute with relu
    x = torch.randn(4, 8, 6, 6)
    torch.manual_seed(0)
    fused = dropout_mod.uout(x, -1.5, after_relu=True)
    torch.manual_seed(0)
    assert torch.equal(fused, dropout_mod.uout(torch.relu(x), -1.5))


DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA'))]


def redraw_here(device: str, monkeypatch) -> None:
    """The CUDA redraw path on `device`: on CPU its Triton kernel runs in Triton's interpreter (conftest)."""
    pytest.importorskip('triton')
    if device == 'cpu':
        if os.environ.get('TRITON_INTERPRET') != '1':  # conftest asks for it only where there is no GPU
            pytest.skip("a Triton kernel runs on CPU tensors only in Triton's interpreter")
        monkeypatch.setattr(dropout_mod, '_redraw_path', lambda x: True)


def redrawn(kind: str, arg: float, x: torch.Tensor, after_relu: bool = False) -> torch.Tensor:
    layer = (Dropout(arg, redraw=True) if kind == 'dropout' else Uout(arg, redraw=True)).train()
    return layer.forward_after_relu(x) if after_relu else layer(x)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize('after_relu', [False, True], ids=['alone', 'after_relu'])
@pytest.mark.parametrize('kind, arg', [('dropout', 0.3), ('uout', 0.3)])
def test_redrawing_dropouts_keep_a_seed_and_draw_again_in_backward(kind, arg, after_relu, dtype, device, monkeypatch):
    redraw_here(device, monkeypatch)
    x = torch.randn(4, 8, 6, 6, dtype=dtype, device=device)
    x.view(-1)[:360] = torch.tensor([0.0, -0.0, float('nan'), -1e-30, float('inf'), -float('inf')]).repeat(60)
    x = x.to(memory_format=torch.channels_last)  # a draw belongs to a position in memory
    g = torch.randn_like(x).contiguous()  # a gradient in another layout than x
    generator = torch.cuda.default_generators[0] if device == 'cuda' else torch.default_generator

    torch.manual_seed(0)
    ours_x = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = redrawn(kind, arg, ours_x, after_relu)
    state_after = generator.get_state()
    ours.backward(g)
    # the multipliers themselves: the same seed on ones in x's layout, in float32
    torch.manual_seed(0)
    m = redrawn(kind, arg, torch.ones_like(x, dtype=torch.float32))
    if kind == 'dropout':
        assert m.unique().tolist() == pytest.approx([0.0, 1 / (1 - arg)])
    else:
        assert m.min() >= 1 - arg and m.max() <= 1 + arg and m.unique().numel() > 0.9 * m.numel()
    inner = torch.relu(x) if after_relu else x
    # products in float32 (float64 for float64), rounded once to dtype; Triton's interpreter truncates to
    # bfloat16 and float16 instead of rounding
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    truncated = device == 'cpu' and dtype in (torch.bfloat16, torch.float16)
    tol = dict(rtol=torch.finfo(dtype).eps if truncated else 0, atol=0, equal_nan=True)
    torch.testing.assert_close(ours, (inner.to(compute) * m.to(compute)).to(dtype), **tol)
    expected_grad = (g.to(compute) * m.to(compute)).to(dtype)
    if after_relu:
        expected_grad = torch.ops.aten.threshold_backward(expected_grad, ours.detach(), 0)
    torch.testing.assert_close(ours_x.grad, expected_grad, **tol)
    torch.manual_seed(0)
    dropout_mod.random_bits(1, torch.int64, x.device)
    assert torch.equal(state_after, generator.get_state())  # it drew its 64-bit seed, nothing more
    # kept for backward: the 8-byte seed, and after a ReLU the output (which the next layer keeps anyway)
    assert sum(t.numel() * t.element_size() for t in saved if t is not ours) == 8
    assert any(t is ours for t in saved) == after_relu


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('after_relu', [False, True], ids=['alone', 'after_relu'])
@pytest.mark.parametrize('kind', ['dropout', 'uout'])
def test_redrawing_dropouts_differentiate_twice(kind, after_relu, device, monkeypatch):
    # a gradient penalty differentiates the gradient: y = m relu(x), sum(y^2)'s gradient 2 m^2 relu(x), whose
    # sum's gradient is 2 m^2 where x > 0 (without the ReLU: 2 m^2 everywhere)
    redraw_here(device, monkeypatch)
    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    torch.manual_seed(0)
    m = redrawn(kind, 0.3, torch.ones_like(x))
    torch.manual_seed(0)
    y = redrawn(kind, 0.3, x, after_relu)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    positive = (x > 0) if after_relu else torch.ones_like(x, dtype=torch.bool)
    torch.testing.assert_close(g, 2 * m * m * x * positive)
    torch.testing.assert_close(gg, 2 * m * m * positive)


def philox4x32_10(counter: np.ndarray, seed: int) -> np.ndarray:
    """Philox-4x32-10 (Salmon et al. 2011) of counters (c, c >> 32, 0, 0) under the 64-bit key `seed`: (4, n)
    uint32 words, written from the paper's round function, not from Triton's code."""
    mask = np.uint64(0xFFFFFFFF)
    c = [(counter.astype(np.uint64) & mask), (counter.astype(np.uint64) >> np.uint64(32)),
         np.zeros(len(counter), np.uint64), np.zeros(len(counter), np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32 & 0xFFFFFFFF)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]  # 64-bit products of 32-bit words
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return np.stack(c).astype(np.uint32)


@pytest.mark.parametrize('device', DEVICES)
def test_redrawn_draws_are_philox_of_the_seed_and_the_position(device, monkeypatch):
    # the mapping dropout_triton.py documents: unit i takes word i // 1024 % 4 of counter i // 4096 * 1024 +
    # i % 1024, keyed by the 64-bit seed drawn from torch's generator; its top 23 bits are the draw
    redraw_here(device, monkeypatch)
    n = 3 * 4096 + 5  # a last, partial program
    ones = torch.ones(n, device=device)
    torch.manual_seed(1)
    seed = int(dropout_mod.random_bits(1, torch.int64, ones.device)) % 2 ** 64
    torch.manual_seed(1)
    dropped = (redrawn('dropout', 0.3, ones) == 0).cpu().numpy()
    i = np.arange(n)
    words = philox4x32_10(i // 4096 * 1024 + i % 1024, seed)[i // 1024 % 4, i]
    v = ((words >> 9).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)
    assert np.array_equal(dropped, v < np.float32(0.3))


@pytest.mark.parametrize('device', DEVICES)
def test_redrawn_masks_and_noise_follow_their_laws_and_the_seed(device, monkeypatch):
    redraw_here(device, monkeypatch)
    n = 1 << 18
    ones = torch.ones(n, device=device)
    torch.manual_seed(0)
    dropped = redrawn('dropout', 0.3, ones) == 0
    noise = redrawn('uout', 0.3, ones)
    torch.manual_seed(0)
    assert torch.equal(redrawn('dropout', 0.3, ones) == 0, dropped) and torch.equal(redrawn('uout', 0.3, ones), noise)
    assert not torch.equal(redrawn('dropout', 0.3, ones) == 0, dropped)  # the generator moved on
    # the drop rate, in every one of the kernel's four Philox words and between neighbours (within 5 sigma)
    rate = dropped.float()
    sigma = math.sqrt(0.3 * 0.7 / n)
    assert abs(rate.mean() - 0.3) < 5 * sigma
    words = rate.view(-1, 4, 1024)  # unit i takes word i // 1024 % 4 of its counter
    assert (words.mean((0, 2)) - 0.3).abs().max() < 5 * 2 * sigma
    for lag in (1, 1024, 4096):  # the next unit, the next word of the same counter, the next program
        assert abs((rate[:-lag] * rate[lag:]).mean() - 0.09) < 5 * math.sqrt(0.09 * 0.91 / n)
    # Uout: uniform on [0.7, 1.3], the same 16 bins equally full (chi-square, 15 degrees, p ~ 1e-6)
    assert noise.min() >= 0.7 and noise.max() <= 1.3
    counts = torch.histc(noise.float().cpu(), bins=16, min=0.7, max=1.3)
    assert ((counts - n / 16) ** 2 / (n / 16)).sum() < 50
    assert abs(noise.float().var() - 0.3 ** 2 / 3) < 0.02 * 0.3 ** 2 / 3
    # a slice (gaps in memory) takes a dense copy; its gradient is the multiplier
    x = torch.ones(8, 64, device=device)[:, ::2].requires_grad_()
    y = redrawn('uout', 0.3, x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y.detach())


AOT_COMPILE = """
import itertools, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from timm_ic.layers.dropout_triton import BLOCK, _redraw_kernel
flags = ('KEEP', 'AFTER_RELU', 'BACKWARD')
variants = [('*bf16', tl.float32, v) for v in itertools.product((True, False), repeat=3)]
variants += [('*fp64', tl.float64, (True, True, False)), ('*fp16', tl.float32, (False, True, False))]
for ptr, compute, values in variants:
    signature = dict(in_ptr=ptr, out_ptr=ptr, relu_out_ptr=ptr, seed_ptr='*i64', n='i32', a='fp32', b='fp32',
                     **{name: 'constexpr' for name in flags + ('COMPUTE', 'BLOCK')})
    constants = dict(zip(flags, values), COMPUTE=compute, BLOCK=BLOCK)
    source = ASTSource(_redraw_kernel, signature, {(list(signature).index(k),): v for k, v in constants.items()})
    assert triton.compile(source, target=GPUTarget('cuda', 90, 32)).asm['cubin'], (ptr, values)
print(len(variants))
"""


def test_redraw_kernel_compiles_for_a_gpu_without_one(tmp_path):
    # the interpreter runs the kernel's Python, not Triton's compiler: this builds it for an H100/H200 (sm_90),
    # down to the cubin, which needs Triton's bundled ptxas but no GPU
    pytest.importorskip('triton')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_CACHE_DIR'] = str(tmp_path)  # not the user's ~/.triton
    done = subprocess.run([sys.executable, '-c', AOT_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == '10'


def test_redraw_without_triton_says_what_to_do(monkeypatch):
    monkeypatch.setattr(dropout_mod, '_redraw_path', lambda x: True)
    monkeypatch.setitem(sys.modules, 'timm_ic.layers.dropout_triton', None)  # as if triton failed to import
    with pytest.raises(RuntimeError, match='needs Triton.*redraw=False'):
        redrawn('dropout', 0.3, torch.ones(4))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('after_relu', [False, True], ids=['alone', 'after_relu'])
@pytest.mark.parametrize('make', [lambda: Dropout(0.3, redraw=True), lambda: Uout(0.3, redraw=True)],
                         ids=['dropout', 'uout'])
def test_redrawing_dropouts_draw_alike_with_and_without_grad(make, after_relu, device, monkeypatch):
    # reentrant checkpointing runs forward without grad, then again with grad from the same generator state:
    # both must take the same kind of draw, or backward sees another mask than forward used
    redraw_here(device, monkeypatch)
    layer = make().train()
    linear = nn.Linear(16, 16).to(device)
    x = torch.randn(64, 16, device=device, requires_grad=True)

    def block(t):
        t = linear(t)
        return layer.forward_after_relu(t) if after_relu else layer(t)

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True) if checkpointed else block(x)
        x.grad = linear.weight.grad = None
        y.square().sum().backward()
        grads.append((x.grad, linear.weight.grad))
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(block(x), y.detach())


@pytest.mark.parametrize('device', DEVICES)
def test_dropouts_redraw_only_when_asked_and_only_on_cuda(device):
    x = torch.randn(4, 8, 6, 6, device=device, requires_grad=True)
    for layer in (Dropout(0.3), Dropout(0.05), Uout(0.3)):
        kept = {}
        for redraw in (False, True):
            set_dropout_redraw(layer.train(), redraw)
            saved = []
            torch.manual_seed(0)  # the same drops: at rate 0.05 the CPU keeps their positions
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                layer(x)
            kept[redraw] = sum(t.numel() * t.element_size() for t in saved if t is not x)
        # CUDA: the mask or noise kept by default, an 8-byte seed with redraw; CPU: its small mask either way
        assert kept[True] == (8 if device == 'cuda' else kept[False]) and kept[False] > 8, (layer, kept)


def no_fast_path(*args, **kwargs):
    raise AssertionError('fast path draws used')


@pytest.mark.parametrize('make', [lambda: Dropout(0.3), lambda: Dropout(0.05), lambda: Uout(0.3)],
                         ids=['dropout', 'dropout_low_rate', 'uout'])
def test_other_devices_use_torch_ops(make, monkeypatch):
    monkeypatch.setattr(dropout_mod, 'random_bits', no_fast_path)
    with torch.device('meta'):  # stands in for CUDA: any device but the CPU
        assert make().train()(torch.empty(4, 8)).shape == (4, 8)
    with pytest.raises(AssertionError, match='fast path draws'):  # and the CPU takes the fast path
        make().train()(torch.ones(4, 8))


def test_rates_too_fine_for_16_bits_keep_their_exact_scale(monkeypatch):
    # 1e-4 is 6.55 / 65536 (drop positions, exact); 1 - 1e-4 keeps 6.55 / 65536 (F.dropout): rounding either to
    # a multiple of 1/65536 would move it by 7%
    monkeypatch.setattr(dropout_mod, 'random_int16', no_fast_path)
    for p in (1e-4, 1 - 1e-4):
        y = Dropout(p).train()(torch.ones(100_000))
        kept = y[y != 0]  # scaled by 1 / (1 - p), not by that of a rounded rate
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))


@pytest.mark.parametrize('make', [lambda: Dropout(0.3), lambda: Dropout(0.05), lambda: Uout(0.3)],
                         ids=['dropout', 'dropout_low_rate', 'uout'])
def test_train_mode_fx_trace_torchscript_and_compile(make):
    layer = make().train()
    x = torch.randn(4, 8, 6, 6)
    torch.manual_seed(0)
    expected = layer(x)
    traced = torch.fx.symbolic_trace(layer)  # the fast path is one wrapped call in the graph
    assert any(n.op == 'call_function' for n in traced.graph.nodes)
    torch.manual_seed(0)
    assert torch.equal(traced(x), expected)
    scripted = torch.jit.script(layer)  # TorchScript takes torch's own ops
    y = scripted(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    compiled = torch.compile(layer, backend='eager', fullgraph=True)  # custom ops: no graph break
    torch.manual_seed(0)
    assert torch.equal(compiled(x), expected)


@pytest.mark.parametrize('after_relu', [False, True], ids=['alone', 'after_relu'])
@pytest.mark.parametrize('make', [lambda: Dropout(0.05), lambda: Dropout(0.3), lambda: Uout(0.3)],
                         ids=['dropout_low_rate', 'dropout', 'uout'])
def test_cpu_dropouts_differentiate_twice(make, after_relu):
    # a gradient penalty: sum(y^2)'s gradient 2 m^2 x, whose sum's gradient is 2 m^2 (after a ReLU, where x > 0)
    layer = make().train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.manual_seed(0)
    m = layer(torch.ones_like(x))
    torch.manual_seed(0)
    y = layer.forward_after_relu(x) if after_relu else layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, 2 * m * m * (x > 0) if after_relu else 2 * m * m)


@pytest.mark.parametrize('after_relu', [False, True], ids=['alone', 'after_relu'])
@pytest.mark.parametrize('make', [lambda: Dropout(0.3), lambda: Dropout(0.05), lambda: Uout(0.3)],
                         ids=['dropout', 'dropout_low_rate', 'uout'])
def test_compiled_cpu_dropouts_match_eager_bit_for_bit_at_zeros_and_infinities(make, after_relu):
    # aot_eager runs the traced multiply (and autograd's derivative of it) where eager runs `_Multiply`: the same
    # bits, the signs of zeros and an infinite input at a dropped unit included, under a negative gradient
    torch._dynamo.reset()
    layer = make().train()

    def f(t):
        return layer.forward_after_relu(t * 1.0) if after_relu else layer(t * 1.0)

    x = torch.randn(4, 8, 6, 6)
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, float('inf'), -float('inf')])
    x.requires_grad_()
    g = -torch.rand(4, 8, 6, 6)
    results = []
    for fn in (f, torch.compile(f, backend='aot_eager', fullgraph=True)):
        torch.manual_seed(0)
        y = fn(x)
        x.grad = None
        y.backward(g)
        results.append((y.detach(), x.grad))
    for eager, compiled in zip(*results):
        assert torch.equal(compiled.view(torch.int32), eager.view(torch.int32))


@pytest.mark.parametrize('backend, partitioner, checkpointed', [
    ('aot_eager', {}, False), pytest.param('inductor', {}, False, marks=pytest.mark.slow),
    ('aot_eager', {'activation_memory_budget': 0.5}, False),
    ('aot_eager', {'ban_recompute_not_in_allowlist': False}, False), ('aot_eager', {}, True)],
    ids=['aot_eager', 'inductor', 'aot_eager_memory_budget', 'aot_eager_recompute_any_op', 'aot_eager_checkpointed'])
@pytest.mark.parametrize('after_relu', [False, True], ids=['alone', 'after_relu'])
@pytest.mark.parametrize('make', [lambda: Dropout(0.3), lambda: Dropout(0.05), lambda: Uout(0.3)],
                         ids=['dropout', 'dropout_low_rate', 'uout'])
def test_compiled_training_on_cpu_draws_what_eager_draws(make, after_relu, backend, partitioner, checkpointed):
    # under torch.compile the CPU dropouts draw from the default generator as eager does, in the same order (two
    # dropouts on parallel branches, which nothing orders but the program), and leave it where eager leaves it;
    # backward draws the drop positions again from the generator state forward returned. With settings that save
    # memory (`partitioner`) the partitioner may run any op again in backward: not a draw. Under activation
    # checkpointing backward runs the forward again, from the generator state it started from
    if backend == 'inductor' and not shutil.which('g++') and not shutil.which('c++'):
        pytest.skip('inductor on CPU needs a C++ compiler')
    torch._dynamo.reset()  # `net` is one code object across the cases: keep them off its recompile limit
    layers = [make().train(), make().train()]
    # branches of different sizes: inductor's memory-minded reordering would draw the smaller first, if it could
    convs = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1, stride=2)]

    def branches(t):
        out = [layer.forward_after_relu(conv(t)) if after_relu else layer(conv(t))
               for layer, conv in zip(layers, convs)]
        return torch.cat([out[0].flatten(), 2 * out[1].flatten()])

    def net(t):
        return torch.utils.checkpoint.checkpoint(branches, t, use_reentrant=False) if checkpointed else branches(t)

    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    g = torch.randn(4 * 8 * (36 + 9))
    # with those settings the dropouts are graph breaks, eager inside; under checkpointing the draws' token (a side
    # effect) breaks the graph at the checkpoint
    compiled = torch.compile(net, backend=backend, fullgraph=not partitioner and not checkpointed)
    results = []
    for f in (net, compiled, compiled):
        torch.manual_seed(0)
        with torch._functorch.config.patch(partitioner):
            y = f(x)
        x.grad = convs[0].weight.grad = convs[1].weight.grad = None
        y.backward(g)
        results.append((y.detach(), x.grad, convs[0].weight.grad, convs[1].weight.grad, torch.get_rng_state()))
    for eager, comp in zip(results[0], results[2]):  # the second compiled call: no compiling in between
        if backend == 'aot_eager' and eager.dtype == torch.float32:  # bit for bit, the signs of zeros too
            assert torch.equal(comp.view(torch.int32), eager.view(torch.int32))
            continue
        exact = backend == 'aot_eager' or eager.dtype == torch.uint8  # inductor fuses bias, ReLU and multiply
        torch.testing.assert_close(comp, eager, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    with torch.no_grad():
        plain = [torch.relu(conv(x)) if after_relu else conv(x) for conv in convs]
    assert not torch.equal(results[0][0], torch.cat([plain[0].flatten(), 2 * plain[1].flatten()]))  # it drew
