"""Diagnostics measure what the papers predict, on real (digits) activations, and leave the model as it was."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import transforms

import timm_ic
from timm_ic.data import DigitsDataset
from timm_ic.diagnostics import (
    ModelDiagnostics, build_report, correlation_reduction, diagnose_model, format_table, mean_abs_correlation,
    mutual_information, plot_correlation, plot_gradient_norm, plot_signal, plot_variance_shift, recalibrate_bn,
    sample_cosine_similarity, signal_propagation, stable_rank, variance_shift, write_report,
)
from timm_ic.diagnostics.signal import BLOCK_PROBE, LAYER_PROBE, block_names
from timm_ic.layers import VarianceNorm2d
from timm_ic.cli import main
from timm_ic.run_record import RunRecord

BATCHES = 6
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


pytestmark = pytest.mark.usefixtures('one_thread')


def _digits_loader(first: int, count: int):
    ds = DigitsDataset('train', transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize([0.305], [0.376])]))
    subset = torch.utils.data.Subset(ds, list(range(first, first + count)))
    return torch.utils.data.DataLoader(subset, batch_size=64, shuffle=False, drop_last=True)


@pytest.fixture(scope='module')
def loader():
    """Fixed batches of real images: the digits, normalised, 64 per batch, always in the same order."""
    return _digits_loader(0, BATCHES * 64)


@pytest.fixture(scope='module')
def heldout():
    """Other digits than `loader`'s, in as many batches."""
    return _digits_loader(BATCHES * 64, BATCHES * 64)


def dropout_then_bn_net(p: float = 0.5) -> nn.Module:
    """conv -> dropout -> BN (the `before_bn` disharmony), twice, then a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.Dropout(p), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.Dropout(p), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def cifar_net(placement: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('cifar_resnet20', placement=placement, in_chans=1, num_classes=10)


def bns_right_after_dropout(model: nn.Module):
    """Names of BN layers whose Sequential runs a dropout just before them."""
    names = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for (_, a), (b_name, b) in zip(children, children[1:]):
                if isinstance(a, nn.Dropout) and isinstance(b, _BatchNorm):
                    names.append(f'{parent_name}.{b_name}' if parent_name else b_name)
    return names


def train_like_statistics(model: nn.Module, loader, num_batches: int = BATCHES) -> nn.Module:
    """What training accumulates: running statistics with dropout on (weights untouched)."""
    return recalibrate_bn(model, loader, num_batches=num_batches, train_mode=True)


# --- variance shift and recalibration -------------------------------------------------------------------------

def test_variance_shift_matches_li_formula_and_recalibration_removes_it(loader):
    p_keep = 0.5
    model = train_like_statistics(dropout_then_bn_net(1 - p_keep), loader)
    # Li et al.: with dropout on, the BN after it sees Var_train = (c^2 + v)/p - c^2 per channel; at test v
    with torch.no_grad():
        x = torch.cat([model[0](images) for images, _ in loader])
    c, v = x.mean(dim=(0, 2, 3)).double(), x.var(dim=(0, 2, 3)).double()
    ratio = ((c.square() + v) / p_keep - c.square()) / v
    expected_first = torch.maximum(ratio, 1 / ratio).mean().item()
    assert expected_first >= 1 / p_keep  # the formula itself: at least 1/p_keep, more for non-zero means

    shift = variance_shift(model, loader, num_batches=BATCHES)
    assert [layer.name for layer in shift.layers] == ['2', '6']
    assert shift.layers[0].shift == pytest.approx(expected_first, rel=0.05)
    assert shift.layers[1].shift > 1.8  # deeper: the same 1/p_keep inflation on top of a shifted input

    recalibrate_bn(model, loader, num_batches=BATCHES)
    after = variance_shift(model, loader, num_batches=BATCHES)
    assert after.max_shift < 1.02

    # torch's update_bn runs the model in train mode: dropout stays on and the shift comes back
    torch.optim.swa_utils.update_bn(loader, model)
    assert variance_shift(model, loader, num_batches=BATCHES).layers[0].shift > 1.8


def test_before_bn_placement_shifts_after_bn_does_not(loader):
    before = train_like_statistics(cifar_net('before_bn'), loader)
    after = train_like_statistics(cifar_net('after_bn'), loader)
    targets = bns_right_after_dropout(before)
    assert len(targets) == 9  # one per residual block of ResNet-20 (drop_units='last')
    assert not bns_right_after_dropout(after)

    shift_before = variance_shift(before, loader, num_batches=BATCHES)
    by_name = {layer.name: layer.shift for layer in shift_before.layers}
    assert min(by_name[name] for name in targets) > 1.8  # drop rate 0.5: at least 1/p_keep = 2 in theory
    assert shift_before.mean_shift > 1.3

    shift_after = variance_shift(after, loader, num_batches=BATCHES)
    assert len(shift_after.layers) == len([m for m in after.modules() if isinstance(m, _BatchNorm)])
    assert shift_after.max_shift < 1.05  # dropout only after the last BN: no shift from the start

    recalibrate_bn(before, loader, num_batches=BATCHES)
    assert variance_shift(before, loader, num_batches=BATCHES).max_shift < 1.05


def test_every_norm_with_running_statistics_is_shifted_and_recalibrated(loader, heldout):
    # VarianceNorm2d and EvoNorm-B0 divide by a running variance at test time, like BN: dropout before them
    # shifts it, and recalibration must re-estimate it
    from timm.layers import EvoNorm2dB0
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.Dropout(0.5), VarianceNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.Dropout(0.5), EvoNorm2dB0(16),
        nn.Conv2d(16, 16, 3, padding=1), EvoNorm2dB0(16, apply_act=False),  # never uses its running_var
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    train_like_statistics(model, loader)
    shift = variance_shift(model, loader, num_batches=BATCHES)
    assert [layer.name for layer in shift.layers] == ['2', '6']
    assert min(layer.shift for layer in shift.layers) > 1.8  # at least 1/p_keep = 2 in theory

    # train-mode passes of the other diagnostics leave those running statistics as they were
    running = [model[2].running_var.clone(), model[6].running_var.clone()]
    signal_propagation(model, loader, num_batches=1)
    correlation_reduction(model, loader, num_batches=1)
    assert torch.equal(model[2].running_var, running[0]) and torch.equal(model[6].running_var, running[1])

    momenta = (model[2].momentum, model[6].momentum)
    recalibrate_bn(model, loader, num_batches=BATCHES)
    assert (model[2].momentum, model[6].momentum) == momenta
    assert variance_shift(model, heldout, num_batches=BATCHES).max_shift < 1.05
    # the cumulative average over the batches, as BatchNorm's momentum=None takes it
    with torch.no_grad():
        per_batch = [model[0](images).var(dim=(0, 2, 3)) for images, _ in loader]
    assert torch.allclose(model[2].running_var, torch.stack(per_batch).mean(0), rtol=1e-4)


def test_recalibrated_shift_is_measured_on_heldout_batches(loader, heldout):
    model = train_like_statistics(cifar_net('before_bn'), loader)
    result = diagnose_model(model, loader, num_batches=BATCHES, heldout=heldout)
    after = result.variance_shift_recalibrated
    assert 'held-out' in after.measured_on and not result.notes
    # the same number as recalibrating on `loader` and measuring on `heldout`, not on `loader`
    recalibrated = recalibrate_bn(copy.deepcopy(model), loader, num_batches=BATCHES)
    on_heldout = variance_shift(recalibrated, heldout, num_batches=BATCHES)
    in_sample = variance_shift(recalibrated, loader, num_batches=BATCHES)
    assert after.mean_shift == pytest.approx(on_heldout.mean_shift, rel=1e-6)
    assert in_sample.mean_shift < after.mean_shift < 1.1  # in sample it is ~1 by construction
    assert result.variance_shift.mean_shift > 1.3
    assert 'held-out' in format_table([result])

    without = diagnose_model(model, loader, num_batches=2)
    assert 'estimated from' in without.variance_shift_recalibrated.measured_on
    assert any('estimated from' in note for note in without.notes)


# --- correlation and mutual information -----------------------------------------------------------------------

@pytest.mark.parametrize('drop', [nn.Dropout(0.5), nn.Dropout(0.2), timm_ic.layers.Uout(0.5)], ids=str)
def test_ic_layer_reduces_correlation_by_p_keep(loader, drop):
    torch.manual_seed(0)
    # an IC layer (BN then dropout) on real conv activations of the digits
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), drop,
                          nn.Conv2d(16, 4, 3))
    (result,) = correlation_reduction(model, loader, num_batches=4)
    assert result.follows_bn and result.layer == '2'
    assert result.input_abs_mean_over_std < 1e-3  # BN centred the units
    assert result.corr_before > 10 * result.corr_noise_floor  # neighbouring conv channels of real images correlate
    assert result.zero_mean and result.no_atom_at_zero and result.input_zero_fraction == 0  # both laws apply
    if isinstance(drop, nn.Dropout):
        p_keep = 1 - drop.p
        assert result.corr_ratio_zero_mean == pytest.approx(p_keep)
        assert result.mi_ratio_expected == pytest.approx(p_keep ** 2)
        assert result.corr_ratio == pytest.approx(p_keep, abs=0.02)
        assert result.mi_ratio == pytest.approx(p_keep ** 2, abs=0.04)
    else:
        assert result.corr_ratio == pytest.approx(3 / (3 + 0.5 ** 2), abs=0.01)  # Li et al.'s Uout factor
        assert result.mi_ratio_expected is None


def test_uncentred_input_loses_more_correlation_as_predicted(loader):
    torch.manual_seed(0)
    # ReLU before dropout (no BN in between): non-zero means, the case the IC layer avoids
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Dropout(0.5))
    (result,) = correlation_reduction(model, loader, num_batches=4)
    assert not result.follows_bn
    assert result.corr_ratio < 0.45  # clearly below p_keep = 0.5
    assert result.corr_ratio == pytest.approx(result.corr_ratio_expected, abs=0.02)
    assert not result.zero_mean and result.corr_ratio_zero_mean is None  # x p_keep is not claimed here


@pytest.mark.parametrize('p_keep', [0.5, 0.9])
def test_mi_law_is_not_predicted_after_relu(loader, p_keep):
    torch.manual_seed(0)
    # after a ReLU about half the inputs are exactly 0: a zero output no longer says the unit was dropped
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Dropout(1 - p_keep))
    (result,) = correlation_reduction(model, loader, num_batches=4)
    assert result.input_zero_fraction > 0.2 and not result.no_atom_at_zero
    assert result.mi_ratio < p_keep ** 2 - 0.05  # the law does not hold here...
    assert result.mi_ratio_expected is None  # ...so it is not printed as the expectation
    table = format_table([ModelDiagnostics(label='relu', correlation=[result])])
    row = next(line for line in table.splitlines() if line.startswith('2 '))
    assert 'neither' in row and f'{p_keep ** 2:.4g}' not in row


def test_kim_placement_dropouts_follow_relu(loader):
    torch.manual_seed(0)
    # Kim et al.'s position: after the last BN-ReLU of each branch, so neither law's condition holds there
    model = timm.create_model('cifar_preresnet20', placement='kim', in_chans=1, num_classes=10,
                              zero_init_last=False)
    units = [r for r in correlation_reduction(model, loader, num_batches=2) if r.layer.startswith('stages')]
    assert len(units) == 9
    assert all(not r.no_atom_at_zero and r.mi_ratio_expected is None for r in units)
    assert all(not r.zero_mean and r.corr_ratio_zero_mean is None for r in units)


def test_ic_resnet20_dropouts_follow_bn(loader):
    torch.manual_seed(0)
    model = timm.create_model('ic_resnet20', placement='ic:drop_rate=0.2', in_chans=1, num_classes=10)
    results = correlation_reduction(model, loader, num_batches=2)
    units = [r for r in results if r.layer != 'head_drop']
    assert units and all(r.follows_bn for r in units)
    live = [r for r in units if r.corr_before == r.corr_before]  # zero-initialised branches have constant units
    assert live and all(abs(r.corr_ratio - 0.8) < 0.03 for r in live)


def test_correlation_primitives():
    torch.manual_seed(0)
    z = torch.randn(20000, 1)
    units = torch.cat([z, 0.6 * z + 0.8 * torch.randn(20000, 1)], dim=1)  # correlation 0.6
    assert mean_abs_correlation(units) == pytest.approx(0.6, abs=0.02)
    independent = torch.randn(20000, 4)
    assert abs(mutual_information(independent)) < 0.01
    # the sampling-noise floor that CorrelationResult.corr_noise_floor reports: sqrt(2 / (pi * samples))
    floor = (2 / (torch.pi * 400)) ** 0.5
    assert mean_abs_correlation(torch.randn(400, 64)) == pytest.approx(floor, rel=0.15)
    assert mutual_information(units) > 0.1


# --- signal propagation ---------------------------------------------------------------------------------------

def test_signal_matches_manual_computation(loader):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    result = signal_propagation(model, loader, num_batches=1)
    assert [layer.name for layer in result.layers] == ['0', '3']

    # the same quantities by hand, on a copy (train mode, as the diagnostic runs)
    manual = copy.deepcopy(model).train()
    images, targets = next(iter(loader))
    out0 = manual[0](images)
    out0.retain_grad()
    h = manual[2](manual[1](out0))
    out3 = manual[3](h)
    out3.retain_grad()
    logits = manual[7](manual[6](manual[5](manual[4](out3.clone()))))
    nn.functional.cross_entropy(logits, targets).backward()
    for layer, out in zip(result.layers, (out0, out3)):
        assert layer.activation_variance == pytest.approx(out.var(dim=(0, 2, 3)).mean().item(), rel=1e-4)
        assert layer.grad_norm == pytest.approx(out.grad.norm().item(), rel=1e-4)
        flat = nn.functional.normalize(out.detach().flatten(1), dim=1)
        gram = flat @ flat.t()
        n = gram.shape[0]
        assert layer.cosine_similarity == pytest.approx(((gram.sum() - n) / (n * (n - 1))).item(), rel=1e-4)
        assert layer.stable_rank == pytest.approx((n / torch.linalg.eigvalsh(gram.double())[-1]).item(), rel=1e-4)


def test_signal_probes_the_residual_stream(loader):
    torch.manual_seed(0)
    model = timm.create_model('cifar_preresnet20', in_chans=1, num_classes=10, zero_init_last=False)
    train_like_statistics(model, loader, 2)
    result = signal_propagation(model, loader, num_batches=1)
    blocks = [f'stages.{i}.{j}' for i in range(3) for j in range(3)]
    assert block_names(model) == blocks
    assert [layer.name for layer in result.at(BLOCK_PROBE)] == blocks
    assert sorted(layer.name for layer in result.at(LAYER_PROBE)) == sorted(
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    # in execution order: each block after the convs inside it
    names = [layer.name for layer in result.layers]
    assert names.index('stages.0.0') > names.index('stages.0.0.units.1.conv')
    # the block output is what the block returns (checked by hand on a copy, same batch, train mode)
    manual = copy.deepcopy(model).train()
    seen = []
    manual.stages[2][2].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    manual(next(iter(loader))[0])
    last = result.at(BLOCK_PROBE)[-1]
    assert last.activation_variance == pytest.approx(seen[0].var(dim=(0, 2, 3)).mean().item(), rel=1e-4)
    # pre-activation: the stream grows with depth, far more than the conv outputs do (Lubana et al.)
    stream, convs = result.at(BLOCK_PROBE), result.at(LAYER_PROBE)
    assert stream[-1].activation_variance > 2 * stream[0].activation_variance
    assert stream[-1].activation_variance > 2 * convs[-1].activation_variance


def test_similarity_and_stable_rank_extremes():
    same = torch.randn(1, 3, 4, 4).repeat(8, 1, 1, 1)
    assert sample_cosine_similarity(same) == pytest.approx(1.0)
    assert stable_rank(same) == pytest.approx(1.0)
    orthogonal = torch.eye(8).view(8, 8, 1, 1)
    assert sample_cosine_similarity(orthogonal) == pytest.approx(0.0)
    assert stable_rank(orthogonal) == pytest.approx(8.0)
    dead = torch.zeros(8, 3, 4, 4)  # e.g. a zero-initialised residual branch: undefined, not 'orthogonal'
    assert math.isnan(sample_cosine_similarity(dead)) and math.isnan(stable_rank(dead))


# --- the model is left as it was -------------------------------------------------------------------------------

def _hooks(model: nn.Module):
    return [(name, kind) for name, m in model.named_modules()
            for kind in ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')
            if getattr(m, kind)]


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: m.training for name, m in model.named_modules()})


def _mixed_mode_model() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model('ic_resnet20', placement='ic:drop_rate=0.2', in_chans=1, num_classes=10)
    model.train()
    model.stages[1].eval()  # per-module flags must come back, not just the top-level one
    return model


@pytest.mark.parametrize('diagnostic', [
    lambda m, dl: variance_shift(m, dl, num_batches=2),
    lambda m, dl: correlation_reduction(m, dl, num_batches=2),
    lambda m, dl: signal_propagation(m, dl, num_batches=2),
    lambda m, dl: signal_propagation(m, dl, num_batches=1, mode='eval', autocast=True),
], ids=['variance_shift', 'correlation', 'signal', 'signal_eval_bf16'])
def test_diagnostics_leave_model_unchanged(loader, diagnostic):
    model = _mixed_mode_model()
    state, modes = _snapshot(model)
    diagnostic(model, loader)
    assert not _hooks(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_recalibration_changes_only_bn_buffers(loader):
    model = _mixed_mode_model()
    momenta = {name: m.momentum for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    state, modes = _snapshot(model)
    recalibrate_bn(model, loader, num_batches=2)
    assert not _hooks(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: m.momentum for name, m in model.named_modules() if isinstance(m, _BatchNorm)} == momenta
    bn_buffers = {f'{name}.{b}' for name, m in model.named_modules() if isinstance(m, _BatchNorm)
                  for b in ('running_mean', 'running_var', 'num_batches_tracked')}
    after = model.state_dict()
    changed = {k for k, v in state.items() if not torch.equal(after[k], v)}
    assert changed and changed <= bn_buffers
    assert all(after[k].item() == 2 for k in bn_buffers if k.endswith('num_batches_tracked'))


def test_bf16_autocast_agrees_with_float32(loader):
    model = train_like_statistics(dropout_then_bn_net(0.5), loader)
    fp32 = variance_shift(model, loader, num_batches=BATCHES)
    bf16 = variance_shift(model, loader, num_batches=BATCHES, autocast=True)
    for a, b in zip(fp32.layers, bf16.layers):
        assert b.shift == pytest.approx(a.shift, rel=0.05)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match='no BatchNorm'):
        variance_shift(nn.Sequential(nn.Conv2d(1, 2, 3)), [torch.zeros(2, 1, 8, 8)])
    with pytest.raises(ValueError, match='num_batches'):
        variance_shift(nn.Sequential(nn.BatchNorm2d(1)), [torch.zeros(2, 1, 8, 8)], num_batches=0)
    with pytest.raises(ValueError, match='no active dropout'):
        correlation_reduction(nn.Sequential(nn.BatchNorm2d(1)), [torch.zeros(2, 1, 8, 8)])
    with pytest.raises(ValueError, match='not a dropout layer'):
        correlation_reduction(nn.Sequential(nn.BatchNorm2d(1), nn.Dropout()), [torch.zeros(2, 1, 8, 8)],
                              layers=['0'])
    with pytest.raises(ValueError, match='targets'):
        signal_propagation(nn.Sequential(nn.Conv2d(1, 2, 3)), [torch.zeros(2, 1, 8, 8)])


# --- figures, report, command line ------------------------------------------------------------------------------

def _assert_png(path: str) -> None:
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()


def test_figures_and_report(loader, tmp_path):
    models = {'before_bn': train_like_statistics(cifar_net('before_bn'), loader, 2),
              'ic': train_like_statistics(cifar_net('ic:drop_rate=0.2'), loader, 2)}
    results = [diagnose_model(m, loader, num_batches=2, label=label) for label, m in models.items()]
    by_label = {r.label: r for r in results}
    paths = [
        plot_variance_shift({k: r.variance_shift for k, r in by_label.items()}, str(tmp_path / 'vs.png'),
                            {k: r.variance_shift_recalibrated for k, r in by_label.items()}),
        plot_signal({k: r.signal for k, r in by_label.items()}, str(tmp_path / 'signal.png')),
        plot_gradient_norm({k: r.signal for k, r in by_label.items()}, str(tmp_path / 'grad.png')),
        plot_correlation({k: r.correlation for k, r in by_label.items()}, str(tmp_path / 'corr.png')),
    ]
    for path in paths:
        _assert_png(path)
    assert sorted(os.listdir(tmp_path)) == ['corr.png', 'grad.png', 'signal.png', 'vs.png']  # no temp files left

    report_path = write_report(build_report(results, dict(batches=2)), str(tmp_path / 'sub' / 'report.json'))
    with open(report_path) as f:
        report = json.load(f)
    table = format_table(results)
    for label, model in models.items():
        entry = report['models'][label]
        bn_names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        assert sorted(layer['name'] for layer in entry['variance_shift']['layers']) == sorted(bn_names)
        assert len(entry['variance_shift_recalibrated']['layers']) == len(bn_names)
        conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        probes = entry['signal']['layers']
        assert sorted(p['name'] for p in probes if p['probe'] == LAYER_PROBE) == sorted(conv_names)
        assert [p['name'] for p in probes if p['probe'] == BLOCK_PROBE] == block_names(model)
        drop_names = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        assert sorted(c['layer'] for c in entry['correlation']) == sorted(drop_names)
        assert all(name in table for name in bn_names)
    assert entry['variance_shift']['layers'][0]['channel_shift']  # per-channel numbers are in the report


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cli_diagnose_on_embedded_digits(tmp_path):
    out = tmp_path / 'diag'
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_ic', 'diagnose', '--model', 'cifar_resnet20', '--placement', 'before_bn',
         '--out', str(out), '--batches', '2', '--batch-size', '32', '--compare', 'after_bn'],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'cifar_resnet20 [before_bn]' in proc.stdout and 'Variance shift per norm layer' in proc.stdout
    assert 'diagnose' in proc.stderr  # the tqdm progress bar
    with open(out / 'report.json') as f:
        report = json.load(f)
    assert list(report['models']) == ['cifar_resnet20 [before_bn]', 'cifar_resnet20 [after_bn]']
    shifts = {k: m['variance_shift']['summary']['mean_shift'] for k, m in report['models'].items()}
    for entry in report['models'].values():  # recalibration checked on images it was not estimated from
        assert entry['variance_shift_recalibrated']['summary']['measured_on'].startswith('held-out')
    assert shifts['cifar_resnet20 [before_bn]'] > 1.3 > shifts['cifar_resnet20 [after_bn]']
    for entry in report['models'].values():  # at init every residual branch carries signal, none is zeroed
        assert 'zero_init_last=False' in entry['weights']
        assert all(layer['grad_norm'] > 0 for layer in entry['signal']['layers'])
    for name in ('variance_shift.png', 'signal.png', 'gradient_norm.png', 'correlation.png'):
        _assert_png(str(out / name))


def test_cli_loads_train_checkpoint_and_rejects_others(tmp_path, capsys):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    model = timm.create_model('cifar_resnet20', placement='before_bn', in_chans=1, num_classes=10)
    for m in model.modules():  # recognisable statistics
        if isinstance(m, _BatchNorm):
            m.running_var.fill_(4.0)
    weights = tmp_path / 'best.safetensors'
    save_file(model.state_dict(), str(weights))
    # the parts of train.py's run record that diagnose reads: the placement and the preprocessing
    RunRecord(model='cifar_resnet20', placement='before_bn', data_config=dict(
        input_size=[1, 12, 12], interpolation='bilinear', mean=[0.3053], std=[0.3759], crop_pct=1.0,
        crop_mode='center')).write(tmp_path / 'run.json')
    out = tmp_path / 'diag'
    assert main(['diagnose', '--model', 'cifar_resnet20', '--checkpoint', str(weights), '--out', str(out),
                 '--batches', '1', '--batch-size', '32', '--no-recalibrate',
                 '--compare', f'cifar_resnet20@{weights}']) == 0
    with open(out / 'report.json') as f:
        models = json.load(f)['models']
    assert list(models) == ['cifar_resnet20', 'cifar_resnet20 #2']
    for entry in models.values():
        assert entry['weights'] == str(weights) and entry['placement'] == 'before_bn'
        assert all(layer['moving_var'] == pytest.approx(4.0) for layer in entry['variance_shift']['layers'])

    capsys.readouterr()
    assert main(['diagnose', '--model', 'cifar_resnet20', '--checkpoint', str(tmp_path / 'w.pth'),
                 '--out', str(out)]) == 2
    assert 'safetensors' in capsys.readouterr().err
    assert main(['diagnose', '--model', 'cifar_resnet20', '--compare', 'no_such_thing', '--out', str(out)]) == 2
    assert 'neither a registered model name nor a placement' in capsys.readouterr().err
    assert main(['diagnose', '--model', 'cifar_resnet20', '--placement', 'bogus', '--out', str(out)]) == 2
    assert "--placement 'bogus' is not a placement" in capsys.readouterr().err


def test_cli_bad_inputs_are_found_before_computing(tmp_path, capsys, monkeypatch):
    # every input found bad exits 2 naming it, before any model is diagnosed (diagnose_model would say so)
    import importlib
    from safetensors.torch import save_file
    # the modules, not the package's functions of the same names
    run_module = importlib.import_module('timm_ic.diagnostics.run')
    variance_shift_module = importlib.import_module('timm_ic.diagnostics.variance_shift')

    def computed(*args, **kwargs):
        raise AssertionError('a diagnostic ran before the inputs were checked')
    monkeypatch.setattr(run_module, 'diagnose_model', computed)
    monkeypatch.setattr(variance_shift_module, 'recalibrate_bn', computed)
    model = timm.create_model('cifar_resnet20', in_chans=1, num_classes=10)
    good = tmp_path / 'good' / 'best.safetensors'
    good.parent.mkdir()
    save_file(model.state_dict(), str(good))
    truncated = tmp_path / 'truncated' / 'best.safetensors'
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:-100])
    corrupt_record = tmp_path / 'corrupt_record' / 'best.safetensors'
    corrupt_record.parent.mkdir()
    corrupt_record.write_bytes(good.read_bytes())
    (corrupt_record.parent / 'run.json').write_text('{"model": "cifar_resnet20", "placem')
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    a_file = tmp_path / 'report.txt'
    a_file.write_text('mine')
    out = str(tmp_path / 'diag')
    base = ['diagnose', '--model', 'cifar_resnet20', '--batches', '1', '--batch-size', '8']
    for argv, words in (
            (['--checkpoint', str(truncated), '--out', out], (str(truncated), 'truncated')),
            # the bad one second: found before the first is diagnosed
            (['--checkpoint', str(good), '--compare', f'cifar_resnet20@{truncated}', '--out', out],
             (str(truncated), 'truncated')),
            (['--checkpoint', str(corrupt_record), '--out', out], (str(corrupt_record.parent / 'run.json'),
                                                                   'not valid JSON')),
            (['--data', str(tmp_path / 'empty'), '--out', out], (str(tmp_path / 'empty'), 'no images')),
            (['--out', str(a_file)], (str(a_file), 'is a file')),
            (['--out', str(a_file / 'diag')], (str(a_file), 'is a file'))):
        assert main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert all(w in err for w in words) and 'Traceback' not in err, err
    assert a_file.read_text() == 'mine' and not os.path.exists(out)


# --- docs/make_figures.py: the figures and numbers in README and docs/ ----------------------------------------

def _make_figures():
    import importlib.util
    spec = importlib.util.spec_from_file_location('make_figures', os.path.join(REPO_ROOT, 'docs', 'make_figures.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_figures_and_numbers_are_those_make_figures_wrote():
    make_figures = _make_figures()
    with open(os.path.join(REPO_ROOT, 'docs', 'figures.json')) as f:
        numbers = json.load(f)
    with open(os.path.join(REPO_ROOT, 'README.md')) as f:
        readme = f.read()
    assert set(numbers) == set(make_figures.FIGURES)  # every figure made, none left over
    for name, figure in make_figures.FIGURES.items():
        assert make_figures.readme_span(readme, name) == figure.render(numbers[name])  # no hand edit, none stale
        for file in numbers[name]['files']:
            _assert_png(os.path.join(REPO_ROOT, 'docs', file))
            assert f'](docs/{file})' in readme
    # made with the command's defaults (8 batches of 64), not --quick's
    placements = numbers['diagnose_placements']
    assert '--batches' not in placements['command']
    assert placements['settings']['batches'] == 8 and placements['settings']['batch_size'] == 64
    assert all(m['recalibrated_measured_on'].startswith('held-out') for m in placements['models'].values())


@pytest.mark.slow
def test_make_figures_regenerates_figures_numbers_and_readme(tmp_path):
    make_figures = _make_figures()
    readme = tmp_path / 'README.md'
    readme.write_text('intro\n<!-- make_figures:diagnose_placements -->\nstale 1.58 / 2.44\n'
                      '<!-- /make_figures:diagnose_placements -->\n<!-- make_figures:placement_study -->\n'
                      '<!-- /make_figures:placement_study -->\nend\n')
    assert make_figures.main(['--quick', '--out', str(tmp_path / 'docs'), '--readme', str(readme)]) == 0
    with open(tmp_path / 'docs' / 'figures.json') as f:
        numbers = json.load(f)
    text = readme.read_text()
    assert 'stale' not in text and text.startswith('intro\n') and text.endswith('end\n')
    figure = make_figures.FIGURES['diagnose_placements']
    assert make_figures.readme_span(text, 'diagnose_placements') == figure.render(numbers['diagnose_placements'])
    models = numbers['diagnose_placements']['models']
    assert list(models) == ['cifar_resnet20 [before_bn]', 'cifar_resnet20 [after_bn]', 'cifar_resnet20 [ic]',
                            'cifar_resnet20 [ic:drop=uout,beta=0.5]']
    assert f"{models['cifar_resnet20 [before_bn]']['shift_mean']:.3g}" in text
    assert sorted(os.listdir(tmp_path / 'docs')) == ['correlation.png', 'figures.json', 'signal.png', 'study',
                                                     'variance_shift.png']  # no temporary file left
    study = numbers['placement_study']
    assert make_figures.readme_span(text, 'placement_study') == make_figures.FIGURES['placement_study'].render(study)
    assert sorted(os.listdir(tmp_path / 'docs' / 'study' / 'cpu')) == sorted(Path(f).name for f in study['files'])
    for name in study['files']:
        _assert_png(str(tmp_path / 'docs' / name))
    for name in ('correlation.png', 'signal.png', 'variance_shift.png'):
        _assert_png(str(tmp_path / 'docs' / name))
    readme.write_text('no markers\n')
    with pytest.raises(SystemExit, match='markers'):
        make_figures.main(['--quick', '--out', str(tmp_path / 'docs'), '--readme', str(readme)])
    assert readme.read_text() == 'no markers\n'  # nothing half-written
