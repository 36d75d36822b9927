"""benchmarks/bench_models.py: the peak training memory column measures the model, not the parent process."""
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


@pytest.mark.slow  # ~10 s: a spawned child imports torch and timm
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='VmHWM is Linux /proc')
def test_peak_train_memory_is_the_childs_own_rise(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # importable by name in the spawned child too
    import bench_models
    ballast = torch.ones(64 * 2 ** 20)  # 256 MiB held by the parent: getrusage's ru_maxrss would carry it over
    rise = bench_models.peak_train_memory_in_child('cifar_resnet20', 2, 32, False, 'cpu')
    assert ballast.sum() > 0
    assert 0 < rise < 64, rise  # two steps at batch 2 hold a few MiB of activations and gradients


def test_ratios_pair_each_repeat_with_its_baseline_and_bad_counts_exit_2(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_models
    # the machine slows down between repeats, model and baseline alike: each repeat's ratio is 1, so is the spread
    assert bench_models.ratio_cell([1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 4.0, 8.0]) == ' 1.00 [1.00-1.00]'
    assert bench_models.ratio_cell([2.0], [1.0]) == ' 0.50 [0.50-0.50]'  # one repeat: no spread to show
    # the model's repeats slow down while the baseline's speed up: the medians and quartiles of the two columns are
    # equal (an unpaired ratio would say 1.00 [1.00-1.00]); the paired ratios are 4, 1.5, 2/3 and 1/4
    r = sorted([4.0, 1.5, 2 / 3, 0.25])
    q1, _, q3 = statistics.quantiles(r, n=4)
    assert bench_models.ratio_cell([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]) == \
        f' {(1.5 + 2 / 3) / 2:4.2f} [{q1:.2f}-{q3:.2f}]'
    monkeypatch.setattr(sys, 'argv', ['bench_models.py', '--repeats', '0'])
    with pytest.raises(SystemExit) as e:
        bench_models.main()
    assert e.value.code == 2


def test_bench_layers_after_relu_times_our_one_op_against_relu_then_torchs_layer(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_layers
    from timm_ic.layers import Dropout, Uout
    calls = []
    for cls in (Dropout, Uout):  # count the calls of the one-op path, then run it
        original = cls.forward_after_relu
        monkeypatch.setattr(cls, 'forward_after_relu',
                            lambda self, x, original=original: calls.append(type(self)) or original(self, x))
    monkeypatch.setattr(sys, 'argv', ['bench_layers.py', '--after-relu', '--shape', '2', '3', '4', '4',
                                      '--steps', '1', '--repeats', '1'])
    bench_layers.main()
    out = capsys.readouterr().out
    assert 'after a ReLU' in out.splitlines()[0]
    assert len(out.splitlines()) == 2 + len(bench_layers.LAYERS)  # a row per layer
    assert set(calls) == {Dropout, Uout} and len(calls) == 2 * len(bench_layers.LAYERS)  # warm-up + 1 repeat


def test_bench_dropout_floor_variants_replace_the_layers_and_put_them_back(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_dropout_floor as floor
    from timm_ic.layers import Dropout, Uout
    x = torch.randn(2, 4, 8, 8)
    layers = [Dropout(0.05).train(), Dropout(0.3).train(), Uout(0.2).train()]
    state = torch.get_rng_state()
    originals = [(cls.forward, cls.forward_after_relu) for cls in (Dropout, Uout)]
    outputs = {}
    for variant in ('none', 'draws', 'one-pass', 'ours'):
        torch.set_rng_state(state)
        with floor.dropouts_as(variant):
            outputs[variant] = [(layer(x), layer.forward_after_relu(x)) for layer in layers]
        outputs[variant + ' rng'] = torch.get_rng_state()
    for variant in ('none', 'draws', 'one-pass'):  # the identity, a ReLU before it kept
        for y, y_relu in outputs[variant]:
            assert torch.equal(y, x) and torch.equal(y_relu, torch.relu(x))
    assert torch.equal(outputs['none rng'], state)  # no draws
    for variant in ('draws', 'one-pass'):  # ours's draws: the generator ends where ours leaves it
        assert torch.equal(outputs[variant + ' rng'], outputs['ours rng'])
    assert not any(torch.equal(y, x) for y, _ in outputs['ours'])  # the layers themselves
    assert [(cls.forward, cls.forward_after_relu) for cls in (Dropout, Uout)] == originals  # put back
    with pytest.raises(RuntimeError), floor.dropouts_as('none'):  # put back after an error too
        raise RuntimeError
    assert [(cls.forward, cls.forward_after_relu) for cls in (Dropout, Uout)] == originals
    torch.set_rng_state(state)
    with floor.dropouts_as('draws'):  # rate 0, beta 0: ours draws nothing, nor do they
        assert torch.equal(Dropout(0.0).train()(x), x) and torch.equal(Uout(0.0).train()(x), x)
    assert torch.equal(torch.get_rng_state(), state)
    xg = x.clone().requires_grad_()
    with floor.dropouts_as('one-pass'):  # one pass each way, with the identity's (ReLU's) gradient
        (g,) = torch.autograd.grad(layers[2].forward_after_relu(xg).sum() + 2 * layers[2](xg).sum(), xg)
    assert torch.equal(g, (x > 0).float() + 2)


def test_bench_dropout_floor_prints_each_variant_and_refuses_a_model_without_dropouts(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_dropout_floor as floor
    monkeypatch.setattr(sys, 'argv', ['bench_dropout_floor.py', '--model', 'ic_resnet20', '--batch-size', '2',
                                      '--repeats', '1'])
    floor.main()
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ['none', 'draws', 'one-pass', 'ours']
    for argv in (['--model', 'cifar_preresnet20'], ['--model', 'resnet18'], ['--repeats', '0']):
        monkeypatch.setattr(sys, 'argv', ['bench_dropout_floor.py', '--batch-size', '2', *argv])
        with pytest.raises(SystemExit) as e:
            floor.main()
        assert e.value.code == 2
