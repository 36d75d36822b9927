"""train.py end to end on the embedded digits and on small image folders: outputs, recipes, input errors,
non-finite loss, and an exact resume after SIGKILL."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

import timm_ic
from timm_ic.training import (
    find_latest_checkpoint, list_checkpoints, load_recipe, list_recipes, prune_checkpoints, save_weights,
)
from timm_ic.run_record import RunRecord
from timm_ic.training import train
from timm_ic.training.options import build_parser

REPO = Path(__file__).resolve().parent.parent
# a quick configuration: 8x8 digits as they are, small batches, few batches per epoch
FAST = ['--input-size', '1', '8', '8', '--batch-size', '32', '--log-interval', '5']


@pytest.fixture(autouse=True)
def fresh_accelerate_state(one_thread):
    """Every in-process run builds its own Accelerator; Accelerate keeps process-wide singletons."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _write_folder(root: Path, classes=('a', 'b', 'c'), per_class=6, splits=('train', 'val')) -> Path:
    """An ImageNet-layout folder of small RGB images whose colour channel encodes the class."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, size=(12, 12, 3), dtype=np.uint8)
                pixels[..., c % 3] += 180
                Image.fromarray(pixels, 'RGB').save(folder / f'{i}.png')
    return root


def _run(argv, capsys=None):
    code = train.main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ''
    return code, err


def test_digits_run_writes_weights_record_summary_and_learns(tmp_path):
    out = tmp_path / 'run'
    code, _ = _run(['--output', out, '--epochs', 3, '--checkpoint-limit', 2, *FAST])
    assert code == 0
    record = json.loads((out / 'run.json').read_text())
    assert record['schema'] == 'timm_ic.run_record/1' and record['status'] == 'finished'
    assert RunRecord.read(out / 'run.json').to_json() == record  # the one type reads what train.py writes
    assert record['model'] == 'ic_resnet20' and record['recipe']['name'] == 'digits_demo'
    assert record['label_names'] == [str(i) for i in range(10)]
    assert set(record['versions']) >= {'torch', 'timm', 'accelerate', 'timm_ic'}
    assert [row['epoch'] for row in record['epochs']] == [1, 2, 3]
    assert all(row['eval_samples'] == 364 for row in record['epochs'])  # the whole digits val split
    # the placement recorded is the model's own, and the weights load back into the model it names
    model = timm.create_model(record['model'], **record['model_args'])
    assert record['placement'] == str(model.placement)
    model.load_state_dict(load_file(out / 'best.safetensors'))
    model.load_state_dict(load_file(out / 'last.safetensors'))
    # 3 short epochs already beat chance (10%) clearly on the validation split
    assert record['metrics']['top1'] > 40, record['epochs']
    assert record['metrics']['top1'] == max(row['eval_top1'] for row in record['epochs'])
    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [1, 2, 3]
    assert float(rows[-1]['eval_top1']) == pytest.approx(record['epochs'][-1]['eval_top1'])
    assert len(list_checkpoints(out / 'checkpoints')) == 2  # pruned to --checkpoint-limit
    assert not list(out.glob('.tmp-*')) and not list((out / 'checkpoints').glob('.tmp-*'))


def test_recipe_values_are_overridden_by_explicit_flags():
    args = train.parse_args(['--recipe', 'cifar_resnet110', '--lr', '0.05', '--data-dir', 'x'])
    assert args.lr == 0.05  # the flag wins
    assert args.epochs == 164 and args.sched == 'multistep' and args.decay_milestones == [82, 123]  # the recipe
    assert args.model == 'cifar_resnet110'
    default = train.parse_args([])
    assert default.recipe == 'digits_demo' and default.model == 'ic_resnet20' and default.in_chans == 1
    assert train.parse_args(['--data-dir', 'x']).recipe is None  # real data: no demo recipe sneaks in


def _default_placement(name: str) -> str:
    with torch.device('meta'):
        return str(timm.create_model(name).placement)


def test_recipe_placement_never_replaces_a_models_own():
    recipe = load_recipe('cifar_wrn28_10')
    for name in ('ic_wrn28_10', 'kim_wrn28_10', 'uout_wrn28_10'):
        args = train.parse_args(['--recipe', 'cifar_wrn28_10', '--model', name, '--data-dir', 'x'])
        model, model_args = train.model_from_args(args, 100, 3, print)
        assert str(model.placement) == _default_placement(name) != recipe['placement'], name
        assert model_args['placement'] == str(model.placement)  # what run.json and the card record
    # the recipe's own (skeleton-only) model gets the recipe's placement; --placement always wins
    for argv, expected in (([], recipe['placement']), (['--placement', 'kim'], 'kim'), (['--placement', ''], 'pre')):
        args = train.parse_args(['--recipe', 'cifar_wrn28_10', '--data-dir', 'x', *argv])
        with torch.device('meta'):
            model, model_args = train.model_from_args(args, 100, 3, print)
        assert str(model.placement) == str(timm_ic.Placement.parse(expected)) == model_args['placement'], argv
    args = train.parse_args(['--recipe', 'cifar_wrn28_10', '--model', 'uout_wrn28_10', '--placement', 'ic',
                             '--data-dir', 'x'])
    assert args.placement == 'ic'


def test_bundled_recipes_are_valid_and_name_known_models():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert {'cifar_wrn28_10', 'cifar_resnet110', 'imagenet_resnet50', 'digits_demo'} <= set(list_recipes())
    for name in list_recipes():
        recipe = load_recipe(name, valid_keys=dests)
        assert timm.is_model(recipe['model']), name
        assert recipe.get('_source'), f'{name} must say where its settings come from'
        if recipe.get('placement'):
            timm_ic.Placement.parse(recipe['placement'])


def test_unknown_recipe_lists_the_valid_ones(capsys):
    code, err = _run(['--recipe', 'cifar_resnet_111'], capsys)
    assert code == 2
    assert "unknown recipe 'cifar_resnet_111'" in err and 'cifar_resnet110' in err and 'digits_demo' in err


def test_recipe_with_unknown_option_is_refused(tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lrr: 0.1\n')
    code, err = _run(['--recipe', bad], capsys)
    assert code == 2 and "unknown option(s) lrr" in err


def test_unknown_model_lists_close_matches(tmp_path, capsys):
    code, err = _run(['--model', 'ic_resnet2', '--output', tmp_path / 'o'], capsys)
    assert code == 2
    assert "unknown model 'ic_resnet2'" in err and 'ic_resnet20' in err


@pytest.mark.parametrize('layout, message', [
    ('missing', 'does not exist'),
    ('empty', 'is empty'),
    ('no_val', 'has no val/ folder'),
    ('empty_class', 'class folder(s) with no images'),
])
def test_bad_data_folders_fail_fast_with_the_reason(tmp_path, capsys, layout, message):
    root = tmp_path / 'data'
    if layout == 'empty':
        root.mkdir()
    elif layout == 'no_val':
        _write_folder(root, splits=('train',))
    elif layout == 'empty_class':
        _write_folder(root)
        (root / 'train' / 'd').mkdir()
    code, err = _run(['--data-dir', root, '--output', tmp_path / 'o'], capsys)
    assert code == 2 and message in err, err
    if layout == 'empty_class':
        assert 'train/d' not in err and ': d.' in err  # names the folder
    assert not (tmp_path / 'o').exists()  # checked before the output folder is made


def test_num_classes_mismatch_is_refused(tmp_path, capsys):
    code, err = _run(['--data-dir', _write_folder(tmp_path / 'data'), '--num-classes', '5',
                      '--output', tmp_path / 'o'], capsys)
    assert code == 2 and '--num-classes 5 does not match the data' in err and 'has 3 classes (a, b, c)' in err


FOLDER_RUN = ['--model', 'ic_resnet20', '--img-size', '12', '--batch-size', '4', '--epochs', '1', '--workers', '0',
              '--log-interval', '2']


def test_unreadable_image_fails_or_is_skipped_and_counted(tmp_path, capsys):
    root = _write_folder(tmp_path / 'data')
    (root / 'train' / 'b' / 'broken.png').write_bytes(b'not a png at all')
    code, err = _run(['--data-dir', root, '--output', tmp_path / 'fail', *FOLDER_RUN], capsys)
    assert code == 2 and 'unreadable image' in err and 'broken.png' in err and '--bad-images skip' in err
    # the same from a data-loader worker process: the message, not the worker's traceback
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with_workers = [*FOLDER_RUN[:FOLDER_RUN.index('--workers')], '--workers', '1']
    code, err = _run(['--data-dir', root, '--output', tmp_path / 'fail1', *with_workers], capsys)
    assert code == 2 and 'train.py: error: unreadable image' in err and 'Traceback' not in err, err

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    code, err = _run(['--data-dir', root, '--output', tmp_path / 'skip', '--bad-images', 'skip', *FOLDER_RUN], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / 'skip' / 'run.json').read_text())
    assert record['skipped_images'] == 1  # one epoch: the broken file was met exactly once
    assert record['label_names'] == ['a', 'b', 'c'] and record['num_classes'] == 3
    assert record['dataset']['train_samples'] == 19 and record['epochs'][0]['eval_samples'] == 18


def _nan_loss_from_fifth_batch(monkeypatch) -> dict:
    """Make the training loss NaN from the fifth batch on; the returned dict counts the loss calls."""
    calls = {'n': 0}
    original = torch.nn.CrossEntropyLoss.forward

    def nan_from_fifth_batch(self, input, target):
        calls['n'] += 1
        loss = original(self, input, target)
        return loss * float('nan') if calls['n'] >= 5 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, 'forward', nan_from_fifth_batch)
    return calls


def test_non_finite_loss_stops_within_a_log_interval_of_its_readout(tmp_path, capsys, monkeypatch):
    # no checkpoint to check before: the loop's own readout (one log interval late, never waiting for the
    # device) stops the epoch early, not its end
    calls = _nan_loss_from_fifth_batch(monkeypatch)
    code, err = _run(['--output', tmp_path / 'run', '--log-interval', '2', '--epochs', '1', '--input-size', '1', '8',
                      '8', '--batch-size', '32'], capsys)
    assert code == 3 and 'loss became non-finite' in err
    assert calls['n'] == 8  # NaN at batch 5, pushed at batch 6, read and stopped at batch 8 (of 44)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    calls = _nan_loss_from_fifth_batch(monkeypatch)
    out = tmp_path / 'run'
    code, err = _run(['--output', out, '--checkpoint-every', '2', '--log-interval', '1', '--epochs', '2',
                      '--input-size', '1', '8', '8', '--batch-size', '32'], capsys)
    assert code == 3 and 'loss became non-finite' in err and '--resume auto' in err
    record = json.loads((out / 'run.json').read_text())
    assert record['status'] == 'stopped: non-finite loss'
    checkpoints = list_checkpoints(out / 'checkpoints')
    assert [c.name for c in checkpoints] == ['checkpoint-000000002', 'checkpoint-000000004']  # none after the NaN
    weights = load_file(checkpoints[-1] / 'model.safetensors')
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())

    # the fix applied (here: the injected NaN removed), the run continues from that checkpoint, named explicitly
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    code = train.main([str(a) for a in ['--resume', checkpoints[-1], '--epochs', '2', '--input-size', '1', '8', '8',
                                        '--batch-size', '32']])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f'resuming from {checkpoints[-1]} (epoch 1, batch 4, 4 updates done)' in captured.out
    record = json.loads((out / 'run.json').read_text())  # the output folder is the checkpoint's run
    assert record['status'] == 'finished' and [r['epoch'] for r in record['epochs']] == [1, 2]


def test_checkpoint_pruning_and_atomic_weights(tmp_path):
    ckpts = tmp_path / 'checkpoints'
    for n in (3, 1, 2, 10):
        (ckpts / f'checkpoint-{n:09d}').mkdir(parents=True)
        (ckpts / f'checkpoint-{n:09d}' / 'train_state.json').write_text('{}')
    (ckpts / 'checkpoint-000000011').mkdir()  # no train_state.json: an incomplete folder is never "latest"
    (ckpts / '.tmp-checkpoint-000000012').mkdir()  # a crash mid-save
    assert find_latest_checkpoint(ckpts).name == 'checkpoint-000000010'
    prune_checkpoints(ckpts, keep=2)
    assert [p.name for p in list_checkpoints(ckpts)] == ['checkpoint-000000003', 'checkpoint-000000010']
    assert not (ckpts / '.tmp-checkpoint-000000012').exists()
    prune_checkpoints(ckpts, keep=1, protect=ckpts / 'checkpoint-000000003')  # the one just saved stays
    assert [p.name for p in list_checkpoints(ckpts)] == ['checkpoint-000000003', 'checkpoint-000000010']
    save_weights({'w': torch.arange(4.0)[::2]}, tmp_path / 'w.safetensors')  # non-contiguous view is fine
    assert torch.equal(load_file(tmp_path / 'w.safetensors')['w'], torch.tensor([0.0, 2.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoints', 'w.safetensors']


@pytest.mark.slow
def test_push_to_hub_exports_and_pushes_the_run_or_keeps_it_and_says_why(tmp_path):
    """train.py --push-to-hub for real, against the loopback Hub (a fresh process: huggingface_hub reads its
    endpoint at import)."""
    from hub_server import FakeHub
    from safetensors.torch import load_file
    env = dict(_subprocess_env(), HF_HUB_DISABLE_XET='1', HF_TOKEN='hf_fake_token', HF_HOME=str(tmp_path / 'home'))
    argv = [sys.executable, str(REPO / 'train.py'), '--epochs', '1', '--limit-train-batches', '2', '--workers', '0',
            *map(str, FAST)]
    out = tmp_path / 'run'
    with FakeHub(token='hf_fake_token') as hub:
        proc = subprocess.run(argv + ['--output', str(out), '--push-to-hub', 'me/digits'], cwd=tmp_path,
                              env=dict(env, HF_ENDPOINT=hub.url), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        pushed = hub.files('me/digits')
    assert set(pushed) >= {'model.safetensors', 'config.json', 'README.md'}
    assert pushed['model.safetensors'] == (out / 'hub_export' / 'model.safetensors').read_bytes()
    weights = load_file(str(out / 'hub_export' / 'model.safetensors'))
    assert all(torch.equal(weights[k], v) for k, v in load_file(str(out / 'best.safetensors')).items())
    config = json.loads(pushed['config.json'])
    assert config['architecture'] == 'ic_resnet20' and config['model_args']['placement'] == 'ic'
    assert 'Pushed' in proc.stdout and 'me/digits' in proc.stdout

    # a dead endpoint: exit 4, the message says why, the trained run and its export are kept
    failed = tmp_path / 'failed'
    proc = subprocess.run(argv + ['--output', str(failed), '--push-to-hub', 'me/digits'], cwd=tmp_path,
                          env=dict(env, HF_ENDPOINT='http://127.0.0.1:9'), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 4, proc.stderr
    assert 'could not reach the Hub' in proc.stderr and f'{failed} is kept' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert (failed / 'best.safetensors').is_file() and (failed / 'hub_export' / 'model.safetensors').is_file()
    assert json.loads((failed / 'run.json').read_text())['status'] == 'finished'

    # the export refuses (a hub_export folder that is not ours): exit 4 too, the user's file and the run are kept
    foreign = tmp_path / 'foreign'
    (foreign / 'hub_export').mkdir(parents=True)
    (foreign / 'hub_export' / 'notes.txt').write_text('mine')
    proc = subprocess.run(argv + ['--output', str(foreign), '--push-to-hub', 'me/digits'], cwd=tmp_path,
                          env=dict(env, HF_ENDPOINT='http://127.0.0.1:9'), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 4, proc.stderr
    assert 'Traceback' not in proc.stderr and 'notes.txt' in proc.stderr
    assert (foreign / 'hub_export' / 'notes.txt').read_text() == 'mine' and (foreign / 'best.safetensors').is_file()


def _subprocess_env():
    # one thread and no data workers: the same arithmetic in every run, so results can be compared exactly
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_gives_identical_weights(tmp_path):
    # with the state beyond the weights: EMA, Mixup's draws, a gradient-accumulation window
    common = [sys.executable, str(REPO / 'train.py'), '--epochs', '2', '--batch-size', '32', '--limit-train-batches',
              '24', '--checkpoint-every', '3', '--workers', '0', '--seed', '7', '--log-interval', '100',
              '--ema-decay', '0.9', '--mixup', '0.2', '--grad-accum-steps', '2']
    reference, interrupted = tmp_path / 'reference', tmp_path / 'interrupted'
    subprocess.run(common + ['--output', str(reference)], check=True, env=_subprocess_env(), cwd=tmp_path,
                   capture_output=True, timeout=300)

    proc = subprocess.Popen(common + ['--output', str(interrupted)], env=_subprocess_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = interrupted / 'checkpoints' / 'checkpoint-000000015'  # epoch 2, update 3 of 12 (batch 6 of 24)
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    latest = find_latest_checkpoint(interrupted / 'checkpoints')
    state = json.loads((latest / 'train_state.json').read_text())
    assert state['num_updates'] < 24 and state['epoch'] == 1 and 0 < state['batches_done'] < 24  # mid-epoch
    assert json.loads((interrupted / 'run.json').read_text())['status'] == 'running'

    resumed = subprocess.run(common + ['--output', str(interrupted), '--resume'], env=_subprocess_env(),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f'resuming from {latest}' in resumed.stdout
    for name in ('last.safetensors', 'best.safetensors'):
        expected, got = load_file(reference / name), load_file(interrupted / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f'{name}: {key} differs after the resume'
    ref_record = json.loads((reference / 'run.json').read_text())
    res_record = json.loads((interrupted / 'run.json').read_text())
    for key in ('eval_top1', 'eval_loss', 'train_loss', 'train_samples_per_rank'):  # the resumed epoch's too
        assert [r[key] for r in ref_record['epochs']] == [r[key] for r in res_record['epochs']], key
    assert ref_record['distributed']['train_samples_per_rank'] == res_record['distributed']['train_samples_per_rank']


def test_training_options_run_together(tmp_path):
    """bf16, channels-last, EMA, Mixup+CutMix with smoothing, accumulation, clipping, a placement, TensorBoard."""
    out = tmp_path / 'run'
    code, _ = _run(['--output', out, '--epochs', '1', '--limit-train-batches', '5', '--grad-accum-steps', '2',
                    '--mixed-precision', 'bf16', '--channels-last', '--ema-decay', '0.9', '--mixup', '0.2',
                    '--cutmix', '1.0', '--smoothing', '0.1', '--clip-grad', '1.0', '--log-with', 'tensorboard',
                    '--placement', 'ic:drop=uout,beta=0.1', *FAST])
    assert code == 0
    record = json.loads((out / 'run.json').read_text())
    assert record['distributed']['mixed_precision'] == 'bf16' and record['weights']['ema'] is True
    assert record['placement'] == str(timm_ic.Placement.parse('ic:drop=uout,beta=0.1'))
    assert np.isfinite(record['epochs'][0]['train_loss'])
    # 5 batches asked for, 4 run: two whole accumulation windows, none left open
    assert [c.name for c in list_checkpoints(out / 'checkpoints')] == ['checkpoint-000000002']
    assert record['epochs'][0]['train_samples_per_rank'] == [4 * 32]
    assert list((out / 'logs').rglob('events.out.tfevents.*'))


def test_placement_on_a_timm_model_is_refused(tmp_path, capsys):
    code, err = _run(['--model', 'resnet10t', '--placement', 'ic', '--output', tmp_path / 'o', *FAST], capsys)
    assert code == 2 and '--placement works with timm-ic models' in err


def test_fine_tune_from_initial_weights_reinitialises_the_classifier(tmp_path, capsys):
    source = timm.create_model('ic_resnet20', num_classes=10, in_chans=1)
    save_weights(source.state_dict(), tmp_path / 'digits.safetensors')
    root = _write_folder(tmp_path / 'data')
    out = tmp_path / 'run'
    # lr 1e-12: each update is below half a float32 ulp of the weights, so they stay as loaded exactly
    code = train.main([str(a) for a in ['--data-dir', root, '--in-chans', '1', '--initial-weights',
                                        tmp_path / 'digits.safetensors', '--lr', '1e-12', '--warmup-lr', '0',
                                        '--output', out, *FOLDER_RUN]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert 'classifier is re-initialised for 3 classes (the pretrained weights have 10)' in captured.out
    tuned = load_file(out / 'last.safetensors')
    conv = source.pretrained_cfg['first_conv'] + '.weight'
    assert torch.equal(tuned[conv], source.state_dict()[conv])
    assert tuned['fc.weight'].shape[0] == 3

    # and back: the 3-class weights onto the 10 digits (the model's own cfg also says 10 classes)
    code = train.main([str(a) for a in ['--initial-weights', out / 'last.safetensors', '--epochs', '1',
                                        '--limit-train-batches', '1', '--output', tmp_path / 'back', *FAST]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert 'classifier is re-initialised for 10 classes (the pretrained weights have 3)' in captured.out

    # weights of another architecture are refused, not half-loaded: also when the classifier is dropped
    # (then timm loads the rest non-strictly)
    for classes, message in ((10, 'could not load'), (5, 'weight names differ')):
        other = tmp_path / f'other{classes}.safetensors'
        save_weights(timm.create_model('cifar_resnet56', num_classes=classes, in_chans=1).state_dict(), other)
        code = train.main([str(a) for a in ['--initial-weights', other, '--output', tmp_path / 'bad', *FAST]])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert 'does not fit --model ic_resnet20' in err


@pytest.mark.slow
def test_hugging_face_dataset_from_a_local_copy(tmp_path):
    root = _write_folder(tmp_path / 'hf', splits=('train', 'validation'))
    out = tmp_path / 'run'
    env = dict(_subprocess_env(), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    result = subprocess.run([sys.executable, str(REPO / 'train.py'), '--dataset', f'hfds/{root}', '--data-dir',
                             str(tmp_path / 'cache'), '--output', str(out), *FOLDER_RUN],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / 'run.json').read_text())
    assert record['label_names'] == ['a', 'b', 'c'] and record['dataset']['train_samples'] == 18
    assert record['epochs'][0]['eval_samples'] == 18


def test_webdataset_shards(tmp_path, capsys, write_shards):
    shards = write_shards(tmp_path / 'shards')
    code, err = _run(['--dataset', 'wds/toy', '--data-dir', shards, '--output', tmp_path / 'o', *FOLDER_RUN], capsys)
    assert code == 2 and 'pass --num-classes N' in err  # shards carry no class names

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path / 'run'
    code, err = _run(['--dataset', 'wds/toy', '--data-dir', shards, '--num-classes', '3', '--output', out,
                      *FOLDER_RUN], capsys)
    assert code == 0, err
    record = json.loads((out / 'run.json').read_text())
    assert record['dataset']['train_samples'] == 24 and record['epochs'][0]['eval_samples'] == 24
    assert record['distributed']['train_samples_per_rank'] == [24]  # 6 batches of 4


def test_crash_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator
    original = Accelerator.save_state
    saves = {'n': 0}

    def crash_on_second_save(self, output_dir=None, **kwargs):
        saves['n'] += 1
        if saves['n'] == 2:  # half-written: one file there, then the process "dies"
            (Path(output_dir) / 'model.safetensors').write_bytes(b'\0' * 10)
            raise KeyboardInterrupt('simulated crash mid-save')
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, 'save_state', crash_on_second_save)
    out = tmp_path / 'run'
    argv = ['--output', out, '--epochs', '1', '--checkpoint-every', '2', '--limit-train-batches', '8', *FAST]
    with pytest.raises(KeyboardInterrupt):
        train.main([str(a) for a in argv])
    assert [c.name for c in list_checkpoints(out / 'checkpoints')] == ['checkpoint-000000002']
    assert (out / 'checkpoints' / '.tmp-checkpoint-000000004').is_dir()  # the torn save, never published

    monkeypatch.setattr(Accelerator, 'save_state', original)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # resuming with other options would silently make it another run: refused, naming the option
    assert train.main([str(a) for a in argv + ['--resume', 'auto', '--batch-size', '16']]) == 2
    assert '--batch-size 32 -> 16' in capsys.readouterr().err

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert train.main([str(a) for a in argv + ['--resume', 'auto']]) == 0
    assert not list((out / 'checkpoints').glob('.tmp-*'))  # cleaned up by the next successful save
    assert json.loads((out / 'run.json').read_text())['status'] == 'finished'


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(tmp_path):
    import shutil
    if shutil.which(os.environ.get('CXX', 'g++')) is None:
        pytest.skip('torch.compile on CPU needs a C++ compiler')
    out = tmp_path / 'run'
    code, _ = _run(['--output', out, '--compile', '--ema-decay', '0.9', '--epochs', '1', '--limit-train-batches', '2',
                    *FAST])
    assert code == 0
    model = timm.create_model('ic_resnet20', num_classes=10, in_chans=1)
    model.load_state_dict(load_file(out / 'last.safetensors'))  # no `_orig_mod.` prefixes from the compiled wrapper


def _reset_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# the smallest run with two checkpoints (mid-epoch at update 2, epoch end at update 4) and an EMA
SMALL = ['--epochs', '1', '--limit-train-batches', '4', '--checkpoint-every', '2', '--ema-decay', '0.9',
         '--workers', '0', *FAST]


class _Payload:
    """Unpickling this writes a marker file: what a planted checkpoint file would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("ran")',)


def _rewrite_checksums(checkpoint: Path) -> None:
    """What someone planting files would do: checksums that match them."""
    import hashlib
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(checkpoint.iterdir())
            if p.is_file() and p.name != 'checksums.json'}
    (checkpoint / 'checksums.json').write_text(json.dumps(sums))


@pytest.mark.slow
def test_resume_never_unpickles_code_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / 'run'
    assert _run(['--output', out, *SMALL]) == (0, '')
    newest = find_latest_checkpoint(out / 'checkpoints')
    marker = tmp_path / 'marker'
    for name in ('custom_checkpoint_0.pkl', 'custom_checkpoint_1.pkl'):  # where Accelerate keeps registered state
        torch.save(_Payload(marker), newest / name)
    _rewrite_checksums(newest)
    _reset_accelerate()
    code, err = _run(['--output', out, '--resume', 'auto', *SMALL], capsys)
    assert not marker.exists()
    assert code == 2 and str(newest) in err and 'Traceback' not in err, err  # Accelerate: files it did not expect
    for name in ('custom_checkpoint_0.pkl', 'custom_checkpoint_1.pkl'):
        (newest / name).unlink()

    # a payload in a file that is loaded (with weights_only=True): refused, the file named, nothing run
    torch.save(_Payload(marker), newest / 'random_states_0.pkl')
    _rewrite_checksums(newest)
    _reset_accelerate()
    code, err = _run(['--output', out, '--resume', 'auto', *SMALL], capsys)
    assert code == 2 and f'{newest / "random_states_0.pkl"} cannot be read' in err, err
    assert 'Traceback' not in err and not marker.exists()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(tmp_path, capsys):
    import shutil
    reference = tmp_path / 'reference'
    assert _run(['--output', reference, *SMALL]) == (0, '')
    older, newest = list_checkpoints(reference / 'checkpoints')
    expected = load_file(reference / 'last.safetensors')
    # each file the resume reads, truncated: the RNG state Accelerate would skip with an INFO line, the
    # weights, the optimizer, our EMA and train state (epoch, history, scheduler)
    for name in ('random_states_0.pkl', 'model.safetensors', 'optimizer.bin', 'ema.safetensors',
                 'train_state.json'):
        out = tmp_path / name
        shutil.copytree(reference, out)
        damaged = out / 'checkpoints' / newest.name / name
        damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 2])
        _reset_accelerate()
        code = train.main([str(a) for a in ['--output', out, '--resume', 'auto', *SMALL]])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert f'{damaged} is damaged' in captured.out, captured.out
        assert f'resuming from {out / "checkpoints" / older.name}' in captured.out
        got = load_file(out / 'last.safetensors')  # redone from the update-2 checkpoint: the same run
        assert all(torch.equal(expected[k], got[k]) for k in expected), name

    # named explicitly: refused, naming the file and the checkpoint that is whole (the resume above replaced
    # the damaged one with a new save: damage it again)
    damaged.write_text('{"epoch": ')
    _reset_accelerate()
    code = train.main([str(a) for a in ['--resume', out / 'checkpoints' / newest.name, *SMALL]])
    err = capsys.readouterr().err
    assert code == 2 and 'train_state.json is damaged' in err and older.name in err, err
    # nothing whole left: refused, each problem named
    (out / 'checkpoints' / older.name / 'optimizer.bin').write_bytes(b'')
    (out / 'checkpoints' / newest.name / 'train_state.json').write_text('{}')
    _reset_accelerate()
    code = train.main([str(a) for a in ['--output', out, '--resume', 'auto', *SMALL]])
    err = capsys.readouterr().err
    assert code == 2 and 'no checkpoint' in err and 'optimizer.bin is damaged' in err, err


def _strict_json(path: Path):
    """JSON as other readers read it: a bare NaN or Infinity is an error."""
    def refuse(constant):
        raise ValueError(f'{path} holds {constant}, which is not JSON')
    return json.loads(path.read_text(), parse_constant=refuse)


def _inf_running_var_from_third_batch(monkeypatch) -> None:
    """From the third training batch on, BatchNorm running variances become inf while the loss stays finite
    (training-mode BN normalises with the batch's own statistics): a divergence the loss does not show."""
    import torch.nn.functional as F
    calls = {'n': 0}
    loss_forward, batch_norm = torch.nn.CrossEntropyLoss.forward, F.batch_norm

    def counting_loss(self, input, target):
        calls['n'] += 1
        return loss_forward(self, input, target)

    def poisoned_batch_norm(input, running_mean, running_var, *args, **kwargs):
        out = batch_norm(input, running_mean, running_var, *args, **kwargs)
        if calls['n'] >= 2 and running_var is not None:
            running_var.data.fill_(float('inf'))  # .data: no autograd version bump
        return out

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, 'forward', counting_loss)
    monkeypatch.setattr(F, 'batch_norm', poisoned_batch_norm)


@pytest.mark.slow
def test_divergent_weights_stop_before_any_save_and_the_advice_works(tmp_path, capsys, monkeypatch):
    _inf_running_var_from_third_batch(monkeypatch)
    out = tmp_path / 'run'
    code, err = _run(['--output', out, *SMALL], capsys)
    assert code == 3 and 'running_var' in err and 'became non-finite' in err, err
    lr = load_recipe('digits_demo')['lr']
    assert f'--resume auto --lr {lr / 10:g}' in err and 'checkpoint-000000002' in err
    # nothing non-finite saved: the update-2 checkpoint is the only one, no best / last weights of epoch 1
    assert [c.name for c in list_checkpoints(out / 'checkpoints')] == ['checkpoint-000000002']
    assert not (out / 'best.safetensors').exists() and not (out / 'last.safetensors').exists()
    record = _strict_json(out / 'run.json')
    assert record['status'] == 'stopped: non-finite weights' and 'running_var' in record['stop_reason']
    started_at = record['started_at']

    # the advice, followed: resume with a lower --lr (the fault removed), recorded in run.json
    monkeypatch.undo()
    _reset_accelerate()
    time.sleep(1.1)  # a later second, so a reset started_at would show
    code, err = _run(['--output', out, *SMALL, '--resume', 'auto', '--lr', lr / 10], capsys)
    assert code == 0, err
    record = _strict_json(out / 'run.json')
    assert record['status'] == 'finished' and record['started_at'] == started_at
    assert record['resumes'] == [{'checkpoint': 'checkpoint-000000002', 'num_updates': 2,
                                  'changed': {'lr': [lr, lr / 10]}}]
    newest = json.loads((find_latest_checkpoint(out / 'checkpoints') / 'train_state.json').read_text())
    assert set(newest['scheduler']['base_values']) == {lr / 10}  # the new --lr's schedule, not the saved one's
    weights = load_file(out / 'last.safetensors')
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_run_json_stays_json_when_a_metric_is_not_finite(tmp_path, monkeypatch):
    evaluate = train.evaluate

    def nan_loss_evaluate(*args, **kwargs):
        return dict(evaluate(*args, **kwargs), loss=float('nan'))

    monkeypatch.setattr(train, 'evaluate', nan_loss_evaluate)
    out = tmp_path / 'run'
    assert _run(['--output', out, '--epochs', '1', '--limit-train-batches', '1', '--workers', '0', *FAST])[0] == 0
    record = _strict_json(out / 'run.json')
    assert record['epochs'][0]['eval_loss'] is None and record['metrics']['loss'] is None
    assert set(record['non_finite']) == {'epochs.0.eval_loss', 'metrics.loss'}


def _bad_inputs(tmp_path: Path) -> dict:
    safetensors = tmp_path / 'w.safetensors'
    save_weights({'w': torch.zeros(1000)}, safetensors)
    truncated, other_format = tmp_path / 'truncated.safetensors', tmp_path / 'pickle.safetensors'
    truncated.write_bytes(safetensors.read_bytes()[:500])
    torch.save({'w': torch.zeros(3)}, other_format)
    local = tmp_path / 'local'
    local.mkdir()
    (local / 'config.json').write_text('{"architecture": ')
    (tmp_path / 'a_file').write_text('')
    return {
        'placement preset': (['--placement', 'nope'], "--placement 'nope': unknown placement preset"),
        'placement key': (['--placement', 'ic:foo=1'], "unknown placement key 'foo'"),
        'placement value': (['--placement', 'ic:drop=uout,beta=-1'], 'Uout beta must be >= 0'),
        'placement item': (['--placement', 'ic:drop'], "placement item 'drop' is not key=value"),
        'negative lr': (['--lr', '-0.1'], '--lr must be greater than 0, not -0.1'),
        'zero lr': (['--lr', '0'], '--lr must be greater than 0, not 0'),
        'workers': (['--workers', '-1'], '--workers must be at least 0, not -1'),
        'repo id': (['--push-to-hub', 'just-a-name'], "--push-to-hub 'just-a-name' is not a Hub repository id"),
        'truncated weights': (['--initial-weights', truncated], f'{truncated} is not a readable safetensors file'),
        'pickled weights': (['--initial-weights', other_format], f'{other_format} is not a readable safetensors'),
        'local-dir config': (['--model', f'local-dir:{local}'], f'--model local-dir:{local}: could not load it'),
        'output is a file': (['--output', tmp_path / 'a_file'], 'is a file, not a folder'),
        'output under a file': (['--output', tmp_path / 'a_file' / 'run'], 'is a file, so the folder cannot be made'),
    }


@pytest.mark.parametrize('case', [
    'placement preset', 'placement key', 'placement value', 'placement item', 'negative lr', 'zero lr', 'workers',
    'repo id', 'truncated weights', 'pickled weights', 'local-dir config', 'output is a file',
    'output under a file'])
def test_bad_input_is_answered_with_exit_2_and_no_output_folder(tmp_path, capsys, case):
    argv, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / 'o'
    code, err = _run(['--output', out, '--epochs', '1', '--limit-train-batches', '1', '--workers', '0', *FAST, *argv],
                     capsys)
    assert code == 2 and message in err and 'Traceback' not in err, err
    assert not out.exists()  # checked before the folder is made


def test_hub_model_unreachable_is_answered_with_exit_2(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # read at import; the env var too, for the message
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    code, err = _run(['--output', tmp_path / 'o', '--model', 'hf-hub:some-org/some-model', *FAST], capsys)
    assert code == 2 and '--model hf-hub:some-org/some-model: could not load it (HF_HUB_OFFLINE is set' in err, err
    assert 'Traceback' not in err and not (tmp_path / 'o').exists()


def test_unwritable_output_is_refused(tmp_path, capsys, monkeypatch):
    locked = tmp_path / 'locked'
    locked.mkdir()
    access = os.access  # root may write anywhere: answer as the file system would for another user
    monkeypatch.setattr(train.os, 'access', lambda path, mode, **kw: False if Path(path) == locked
                        else access(path, mode, **kw))
    code, err = _run(['--output', locked / 'run', '--epochs', '1', '--limit-train-batches', '1', *FAST], capsys)
    assert code == 2 and f'{locked} is not writable by this user' in err, err


def test_a_previous_run_is_not_overwritten_without_overwrite(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'run.json').write_text('{"status": "finished"}')
    (out / 'best.safetensors').write_bytes(b'weights of a previous run')
    code, err = _run(['--output', out, '--epochs', '1', '--limit-train-batches', '1', '--workers', '0', *FAST],
                     capsys)
    assert code == 2 and 'holds a previous run (run.json, best.safetensors)' in err and '--overwrite' in err, err
    assert (out / 'best.safetensors').read_bytes() == b'weights of a previous run'
    _reset_accelerate()
    code, err = _run(['--output', out, '--epochs', '1', '--limit-train-batches', '1', '--workers', '0', '--overwrite',
                      *FAST], capsys)
    assert code == 0, err
    assert json.loads((out / 'run.json').read_text())['status'] == 'finished'
    load_file(out / 'best.safetensors')  # the new run's weights


def test_redraw_dropout_flag_sets_every_dropout_of_the_model(monkeypatch):
    import importlib.util
    from types import SimpleNamespace
    import timm
    from timm_ic.layers import Dropout, Uout
    cpu = SimpleNamespace(device=torch.device('cpu'), num_processes=1)
    for argv, expected in (([], False), (['--redraw-dropout'], True)):
        model = train.adapt_model(train.parse_args(argv), cpu, timm.create_model('uout_wrn28_10', num_classes=10))
        drops = [m for m in model.modules() if isinstance(m, (Dropout, Uout))]
        assert drops and all(m.redraw is expected for m in drops)
    # on CUDA without Triton the flag is a usage error before training, not a traceback at the first step
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'triton' else find_spec(name, *a))
    cuda = SimpleNamespace(device=torch.device('cuda'), num_processes=1)
    with pytest.raises(train.UsageError, match='needs Triton.*pip install triton'):
        train.adapt_model(train.parse_args(['--redraw-dropout']), cuda, timm.create_model('ic_resnet20'))
