"""benchmarks/placement_study.py: the grid and its shards, resume (a finished run is never redone), merging,
and the statistics (Welch's interval and p value against scipy). The end-to-end test trains a 2 x 2 grid of
one-epoch runs on tiny synthetic IDX files."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from accelerate import Accelerator
from scipy import stats
from timm.data import create_transform, resolve_data_config

import timm_ic  # noqa: F401  (the architectures)
from timm_ic.training.loop import evaluate

REPO = Path(__file__).resolve().parent.parent


def _load_study():
    spec = importlib.util.spec_from_file_location('placement_study', REPO / 'benchmarks' / 'placement_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _load_study()
RunRecord = study.RunRecord


@pytest.mark.parametrize('a,b', [
    ([91.2, 90.8, 91.5], [90.1, 90.4, 89.9, 90.3]),
    ([80.0, 85.0, 82.0, 81.0, 79.5], [80.5, 84.0, 81.0, 83.0, 80.0]),
    ([1.0, 2.0], [10.0, 30.0, 20.0]),
])
def test_welch_matches_scipy(a, b):
    ours = study.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    low, high = ref.confidence_interval(0.95)
    assert ours['p'] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (ours['low'], ours['high']) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert ours['diff'] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert ours['significant'] == (ref.pvalue < 0.05)


def test_welch_needs_two_values_each_and_handles_zero_spread():
    assert study.welch([1.0], [2.0, 3.0]) is None
    same = study.welch([90.0, 90.0], [90.0, 90.0])
    assert same['significant'] is False and same['low'] == same['high'] == 0.0
    assert study.welch([91.0, 91.0], [90.0, 90.0])['significant'] is True


def test_shards_partition_the_grid_and_shared_arms_run_once():
    preset = study.PRESETS['cpu']
    grid = study.build_grid(preset)
    keys = [(r.args, r.seed) for r in grid]
    assert len(keys) == len(set(keys)) == len({r.name for r in grid})
    # chen's 'post' and ioffe's 'bn@lr0.1' are the same train.py run
    arms = study.questions_for(preset)
    assert study.arm_args(preset, arms['chen'].arms['post']) == study.arm_args(preset, arms['ioffe'].arms['bn@lr0.1'])
    for n in (1, 2, 3, 7):
        shards = [study.shard(grid, i, n) for i in range(n)]
        names = [r.name for s in shards for r in s]
        assert sorted(names) == sorted(r.name for r in grid) and len(names) == len(set(names))
    assert study.parse_shard('2/3') == (2, 3)
    for bad in ('3/3', '1', 'a/b', '-1/2'):
        with pytest.raises(Exception):
            study.parse_shard(bad)


def test_every_placement_of_every_preset_builds_and_grouped_norms_have_a_group_size():
    import warnings
    import timm
    import timm_ic  # noqa: F401
    from timm_ic.layers.norm import GROUPED_NORMS
    seen = set()
    for preset in study.PRESETS.values():
        for question in study.questions_for(preset).values():
            for arm in question.arms.values():
                if arm.placement not in seen:
                    seen.add(arm.placement)
                    placement = timm_ic.Placement.parse(arm.placement)
                    if placement.norm in GROUPED_NORMS:  # chosen, not the width-dependent default
                        assert placement.group_size == study.GROUP_SIZE, arm.placement
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter('always')
                        timm.create_model(study.MODEL, in_chans=1, num_classes=10, placement=arm.placement)
                    # no arm is InstanceNorm in all but name (group size 1) by accident
                    assert not [w for w in caught if 'one channel per group' in str(w.message)], arm.placement
    assert len(seen) >= 15
    assert {'post:norm=groupnorm,group_size=8', 'post:norm=evonorm_s0,group_size=8'} <= seen


def _fake_run(folder: Path, top1s, status='finished', train_loss=0.5, eval_loss=0.7):
    folder.mkdir(parents=True)
    epochs = [dict(epoch=i + 1, eval_top1=t, eval_loss=eval_loss, train_loss=train_loss, epoch_time_s=1.0)
              for i, t in enumerate(top1s)]
    RunRecord(model=study.MODEL, status=status, epochs=epochs).write(folder / 'run.json')


def test_merge_reports_means_intervals_and_no_significant_difference(tmp_path):
    preset = study.PRESETS['tiny']
    preset = study.Preset(**{**vars(preset), 'seeds': 3})
    grid = study.build_grid(preset)
    values = {'post': [80.0, 81.0, 79.0], 'pre': [80.5, 79.5, 80.0]}  # overlapping: no significant difference
    for run in grid:
        arm = run.name.split('-')[0]
        _fake_run(tmp_path / 'runs' / run.name, [values[arm][run.seed]])
    results = study.merge(tmp_path, 'tiny', preset, compute=False)
    arm = results['questions']['tiny']['arms']['post']['top1']
    assert (arm['n'], arm['mean'], arm['std']) == (3, 80.0, 1.0)
    comparison = next(c for c in results['questions']['tiny']['comparisons'] if c['metric'] == 'top1')
    ref = stats.ttest_ind(values['pre'], values['post'], equal_var=False)
    assert comparison['welch']['p'] == pytest.approx(ref.pvalue)
    text = (tmp_path / 'results.md').read_text()
    assert 'pre − post, test top-1 (%): +0.000' in text and 'no significant difference' in text
    assert '80.00 ± 1.00 (n=3)' in text
    assert (tmp_path / 'accuracy.png').stat().st_size > 1000
    # a clear difference is called significant
    for run in grid:
        if run.name.startswith('pre'):
            RunRecord(model=study.MODEL, status='finished', epochs=[dict(
                epoch=1, eval_top1=90.0 + run.seed * 0.1, eval_loss=0.3, train_loss=0.2, epoch_time_s=1.0)]).write(
                tmp_path / 'runs' / run.name / 'run.json')
    results = study.merge(tmp_path, 'tiny', preset, compute=False)
    comparison = next(c for c in results['questions']['tiny']['comparisons'] if c['metric'] == 'top1')
    assert comparison['welch']['significant'] and comparison['welch']['low'] > 0


def test_unfinished_and_stopped_runs():
    record = lambda status, epochs: RunRecord(model=study.MODEL, status=status, epochs=epochs)
    assert not study.is_done(None, 2)
    assert not study.is_done(record('running', [{}]), 2)
    assert not study.is_done(record('finished', [{}]), 2)  # a run of fewer epochs: not this grid's
    assert study.is_done(record('finished', [{}, {}]), 2)
    assert study.is_done(record('stopped: non-finite loss', []), 2)
    assert study.final_top1(record('stopped: non-finite loss', [{'eval_top1': 50.0}])) is None


def test_a_refused_or_missing_record_is_not_done(tmp_path):
    # run.json goes through RunRecord.read: what it refuses (no schema, another schema, half written) is "not
    # done", so the study hands the folder back to train.py's --resume auto instead of counting a stranger's run
    folder = tmp_path / 'run'
    assert study.read_record(folder) is None
    epochs = [dict(epoch=1, eval_top1=80.0, eval_loss=0.5, train_loss=0.4)]
    _fake_run(folder, [80.0])
    assert study.is_done(study.read_record(folder), 1)
    for text in (json.dumps(dict(status='finished', epochs=epochs)),  # plain JSON without the schema
                 json.dumps(dict(schema='timm_ic.run_record/0', model=study.MODEL, status='finished', epochs=epochs)),
                 '{"schema": "timm_ic.run_record/1", "status": "fini'):  # cut off while written
        (folder / 'run.json').write_text(text)
        assert study.read_record(folder) is None
        assert not study.is_done(study.read_record(folder), 1)


@pytest.mark.slow
def test_study_runs_shards_merges_and_never_redoes_a_finished_run(tmp_path, monkeypatch, capsys, write_idx_set):
    write_idx_set(tmp_path / 'data' / 'FashionMNIST' / 'raw', n_train=40, n_test=20)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('TIMM_IC_FASHION_MNIST_DEBIAN_DIR', str(tmp_path / 'no-package'))
    monkeypatch.setenv('TIMM_IC_DATA_CACHE', str(tmp_path / 'cache'))
    out = tmp_path / 'study'
    common = ['--preset', 'tiny', '--out', str(out), '--data-dir', str(tmp_path / 'data')]
    assert study.main(common + ['--shard', '0/2']) == 0
    first = capsys.readouterr().out
    assert '2 run, 0 already done, 0 failed' in first
    done_first = {p.parent.name for p in out.glob('runs/*/run.json')}
    assert len(done_first) == 2
    assert study.main(common + ['--shard', '1/2']) == 0
    capsys.readouterr()
    runs = sorted(out.glob('runs/*/run.json'))
    assert len(runs) == 4 and done_first < {p.parent.name for p in runs}  # the shards partition the grid
    results = json.loads((out / 'results.json').read_text())
    assert results['runs_done'] == 4
    post = results['questions']['tiny']['arms']['post']
    assert post['top1']['n'] == 2 and post['variance_shift']['n'] == 2 and post['top1_recalibrated']['n'] == 2
    assert post['logit_spread']['values'] == [0.0, 0.0]  # from spread.json; the tiny arms have no dropout
    # Lubana et al.'s probes at initialisation, per seed: the seeds' inits differ, the train mode's batch is the run's
    growth = post['stream_variance_growth']['values']
    assert len(growth) == 2 and growth[0] != growth[1] and all(v > 0 for v in growth)
    assert all(json.loads(p.read_text())['batch_size'] == 8 for p in out.glob('runs/*/init_signal.json'))
    assert all(json.loads(p.read_text())['num_images'] == 20 for p in out.glob('runs/*/spread.json'))
    assert all(r['top1'] is not None for r in results['runs'].values())
    for folder in out.glob('runs/*'):  # the analysis evaluates the same weights on the same images as train.py
        analysis = json.loads((folder / 'analysis.json').read_text())
        assert analysis['top1'] == json.loads((folder / 'run.json').read_text())['epochs'][-1]['eval_top1']
    assert (out / 'tiny_recalibration_and_shift.png').is_file()
    provenance = results['provenance']
    assert provenance['command'].startswith('python benchmarks/placement_study.py --preset tiny --out ')
    assert provenance['versions']['torch'] == torch.__version__ and provenance['train_seconds'] > 0

    # the best 'pre' run, exported, loads as a user loads it and gives the accuracy its run recorded
    exported = results['exports']['pre']
    pre_runs = results['questions']['tiny']['arms']['pre']['runs']
    assert exported['run'] == max(pre_runs, key=lambda n: results['runs'][n]['best_top1'])
    recorded = json.loads((out / 'runs' / exported['run'] / 'run.json').read_text())['metrics']['top1']
    model = timm.create_model(f'local-dir:{out / exported["folder"]}', pretrained=True)
    assert model.num_classes == 10 and str(model.placement) == 'pre'
    test_set = torchvision.datasets.FashionMNIST(str(tmp_path / 'data'), train=False, transform=create_transform(
        **resolve_data_config(model=model), is_training=False))
    top1 = evaluate(model, torch.utils.data.DataLoader(test_set, batch_size=7), Accelerator(cpu=True), 10)['top1']
    # the same images right: 1e-3 points is far below one image in 10,000 (float32 per-batch percentages)
    assert top1 == pytest.approx(recorded, abs=1e-3) and exported['reloaded_top1'] == pytest.approx(recorded, abs=1e-3)

    # the whole grid again: nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    assert study.main(common) == 0
    assert '0 run, 4 already done' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps

    # a run killed before it finished (its record says running): only that one is continued, from its checkpoint
    killed = runs[0]
    record = json.loads(killed.read_text())
    killed.write_text(json.dumps({**record, 'status': 'running'}))
    assert study.main(common) == 0
    assert '1 run, 3 already done' in capsys.readouterr().out
    assert json.loads(killed.read_text())['status'] == 'finished'
    assert 'resuming from' in (killed.parent / 'train.log').read_text()
    assert {p: p.stat().st_mtime_ns for p in runs[1:]} == {p: stamps[p] for p in runs[1:]}


def test_merge_of_a_partial_study_is_strict_json(tmp_path):
    preset = study.PRESETS['tiny']
    first = study.build_grid(preset)[0]
    _fake_run(tmp_path / 'runs' / first.name, [50.0])  # one run of four: n=1 and n=0 arms
    study.merge(tmp_path, 'tiny', preset, compute=False)

    def refuse(constant):
        raise ValueError(f'{constant} in results.json')
    results = json.loads((tmp_path / 'results.json').read_text(), parse_constant=refuse)
    assert results['runs_done'] == 1
    assert 'no interval (n = 0 and 1' in (tmp_path / 'results.md').read_text()


def test_head_dropout_before_pooling_spreads_the_logits_less_than_after():
    # Kim et al.'s head argument (papers.md): element-wise dropout averaged over H*W positions moves the pooled
    # features, hence the logits, far less than the same rate on the pooled features
    import timm
    import torch
    import timm_ic  # noqa: F401
    torch.manual_seed(0)
    before = timm.create_model(study.MODEL, in_chans=1, num_classes=10, placement='post:head=before_pool,head_rate=0.3')
    after = timm.create_model(study.MODEL, in_chans=1, num_classes=10, placement='post:head=after_pool,head_rate=0.3')
    after.load_state_dict(before.state_dict())  # the same weights: only the dropout's place differs
    plain = timm.create_model(study.MODEL, in_chans=1, num_classes=10, placement='post')
    plain.load_state_dict(before.state_dict())
    images = torch.randn(16, 1, 28, 28)
    torch.manual_seed(1)
    spread_before = study.logit_spread(before, images, masks=8)
    spread_after = study.logit_spread(after, images, masks=8)
    assert 0 < spread_before < spread_after / 2  # 7x7 final map: about 1/7 of the std
    assert study.logit_spread(plain, images, masks=8) == 0.0  # no dropout, no spread
    assert not any(m.training for m in before.modules())  # left in eval mode


def test_epochs_to_target_and_largest_lr_get_intervals_only_when_every_seed_has_one(tmp_path):
    preset = study.Preset(epochs=2, seeds=3, images_per_epoch=16, target=75.0, trains_above=50.0, batch_size=8,
                          workers=0, lrs=(0.1, 1.6), questions=('ioffe',))
    grid = study.build_grid(preset)
    curves = {('bn@lr0.1', s): [80.0, 85.0] for s in range(3)}  # reaches 75% in epoch 1, every seed
    curves.update({('bn@lr1.6', s): [60.0, 70.0] for s in range(3)})  # trains (> 50%), never reaches the target
    curves.update({('none@lr0.1', 0): [60.0, 80.0], ('none@lr0.1', 1): [60.0, 80.0], ('none@lr0.1', 2): [60.0, 70.0]})
    curves.update({('none@lr1.6', s): [10.0, 10.0] for s in range(3)})  # does not train

    def write(curves):
        for run in grid:
            arm = run.name.rsplit('-', 2)[0]
            RunRecord(model=study.MODEL, status='finished', epochs=[
                dict(epoch=i + 1, eval_top1=t, eval_loss=0.5, train_loss=0.4) for i, t in enumerate(
                    curves[(arm, run.seed)])]).write(tmp_path / 'runs' / run.name / 'run.json')
        return study.merge(tmp_path, 'x', preset, compute=False)

    for run in grid:
        (tmp_path / 'runs' / run.name).mkdir(parents=True)
    q = write(curves)['questions']['ioffe']
    none = q['arms']['none@lr0.1']['epochs_to_target']
    assert none['not_reached'] == 1 and none['n'] == 2
    epochs_cmp = next(c for c in q['comparisons'] if c['metric'] == 'epochs_to_target')
    assert epochs_cmp['welch'] is None and epochs_cmp['not_reached_by_every_seed']
    assert q['lr_sweeps']['bn']['largest_lr']['values'] == [1.6] * 3
    assert q['lr_sweeps']['none']['largest_lr']['values'] == [0.1] * 3
    lr_cmp = q['lr_comparisons'][0]
    assert (lr_cmp['a'], lr_cmp['b'], lr_cmp['n_a'], lr_cmp['n_b']) == ('bn', 'none', 3, 3)
    assert lr_cmp['welch']['diff'] == pytest.approx(1.5) and lr_cmp['welch']['significant']
    text = (tmp_path / 'results.md').read_text()
    assert 'not reached by every seed (2 of 3 reached: 2, 2)' in text
    assert 'bn@lr0.1 − none@lr0.1, epochs to target: no interval: not reached by every seed' in text
    assert 'largest lr that trains (final top-1 > 50%, lrs tried [0.1, 1.6]), bn: 1.600 ± 0.000 (n=3)' in text
    assert 'bn − none, largest lr that trains: +1.500' in text

    # every seed reaches the target: an interval; one seed where no lr trains: no largest lr for that group
    curves[('none@lr0.1', 2)] = [60.0, 90.0]
    curves[('none@lr0.1', 1)] = [10.0, 10.0]
    q = write(curves)['questions']['ioffe']
    assert q['arms']['bn@lr0.1']['epochs_to_target']['values'] == [1, 1, 1]
    assert q['lr_sweeps']['none']['largest_lr_per_seed'][1] is None and not q['lr_sweeps']['none']['every_seed']
    assert q['lr_comparisons'][0]['welch'] is None
    text = (tmp_path / 'results.md').read_text()
    assert 'none: not reached by every seed (s0: 0.1, s1: none, s2: 0.1)' in text
    assert 'bn − none, largest lr that trains: no interval: not reached by every seed' in text

    # every seed reaches the target in both arms: the comparison gets its interval
    curves[('none@lr0.1', 1)] = [60.0, 90.0]
    q = write(curves)['questions']['ioffe']
    epochs_cmp = next(c for c in q['comparisons'] if c['metric'] == 'epochs_to_target')
    assert not epochs_cmp['not_reached_by_every_seed'] and epochs_cmp['welch']['diff'] == -1.0
    assert 'bn@lr0.1 − none@lr0.1, epochs to target: -1.000 [-1.000, -1.000]' in (tmp_path / 'results.md').read_text()


def _arm(values, not_reached=0):
    return dict(study.mean_std(values), not_reached=not_reached)


def test_claims_are_held_contradicted_or_undecided_by_their_interval():
    chen = {'metrics': ['top1', 'epochs_to_target'], 'lr_sweeps': {}, 'arms': {
        'ic': {'top1': _arm([80.0, 80.5, 81.0]), 'epochs_to_target': _arm([2, 2], not_reached=1)},
        'post': {'top1': _arm([70.0, 70.4, 69.8]), 'epochs_to_target': _arm([3, 3, 3])},
        'pre': {'top1': _arm([79.0, 81.5, 80.2]), 'epochs_to_target': _arm([2, 3, 2])}}}
    kim = {'metrics': ['top1', 'logit_spread'], 'lr_sweeps': {}, 'arms': {
        'kim': {'top1': _arm([60.0, 60.2]), 'logit_spread': _arm([0.5, 0.52])},
        'head_after_pool': {'top1': _arm([60.0]), 'logit_spread': _arm([0.2, 0.21, 0.19])}}}
    ioffe = {'metrics': ['top1'], 'arms': {}, 'lr_sweeps': {
        'bn': {'every_seed': True, 'missing_seeds': [], 'largest_lr': study.mean_std([1.6, 1.6, 0.4])},
        'none': {'every_seed': False, 'missing_seeds': [], 'largest_lr': study.mean_std([])}}}
    verdicts = {(c['question'], c['a'], c['b'], c['metric']): c for c in
                study.claim_verdicts({'chen': chen, 'kim': kim, 'ioffe': ioffe})}
    assert verdicts[('chen', 'ic', 'post', 'top1')]['verdict'] == 'held'
    assert verdicts[('chen', 'ic', 'pre', 'top1')]['verdict'] == 'undecided'
    assert verdicts[('chen', 'ic', 'pre', 'top1')]['why'] == 'no significant difference'
    assert verdicts[('chen', 'ic', 'post', 'epochs_to_target')]['why'] == 'not reached by every seed'
    # a smaller spread is the claim: after-pool's is smaller here, so the claim is contradicted, said plainly
    spread = verdicts[('kim', 'kim', 'head_after_pool', 'logit_spread')]
    assert spread['verdict'] == 'contradicted' and spread['welch']['diff'] > 0
    assert ('kim', 'kim', 'every_unit', 'top1') not in verdicts  # an arm that did not run: no verdict at all
    assert verdicts[('ioffe', 'bn', 'none', 'largest_lr')]['verdict'] == 'undecided'
    assert 'contradicted' in study.claim_line(spread) and '[' in study.claim_line(spread)


def test_arms_reruns_one_arm_and_one_seed_and_refuses_an_unknown_arm(tmp_path, capsys):
    assert study.main(['--preset', 'cpu', '--out', str(tmp_path), '--arms', 'ic', '--seeds', '1', '--dry-run']) == 0
    planned = [line.split(':')[0].strip() for line in capsys.readouterr().out.splitlines() if line.startswith('  ')]
    assert len(planned) == 1 and planned[0].startswith('ic-') and planned[0].endswith('-s0')
    # the same run folder name as in the whole grid: a rerun lands where the committed result came from
    assert planned[0] in {r.name for r in study.build_grid(study.PRESETS['cpu'])}
    with pytest.raises(SystemExit) as exit_info:
        study.main(['--preset', 'cpu', '--out', str(tmp_path), '--arms', 'icc', '--dry-run'])
    assert exit_info.value.code == 2 and "--arms ['icc']" in capsys.readouterr().err
