"""Two CPU processes (gloo) train as one job: `accelerate launch --multi_gpu --num_processes 2` with
ACCELERATE_USE_CPU=1 (`--cpu --num_processes 2` would start one process only)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from timm_ic.training import list_checkpoints

REPO = Path(__file__).resolve().parent.parent
BATCH = 16
DIGITS_TRAIN, DIGITS_VAL = 1433, 364


def _launch_two_processes(tmp_path: Path, *train_args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU='1', GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_port', '0', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), *train_args]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_cpu_processes_split_the_data_and_gather_the_metrics(tmp_path):
    out = tmp_path / 'run'
    result = _launch_two_processes(tmp_path, '--output', str(out), '--epochs', '1', '--input-size', '1', '8', '8',
                                   '--batch-size', str(BATCH), '--workers', '0', '--checkpoint-every', '20')

    record = json.loads((out / 'run.json').read_text())
    assert record['distributed']['world_size'] == 2
    assert record['distributed']['distributed_type'] == 'MULTI_CPU'
    # each process took its own half of the shuffled batches: per process, batches of BATCH, as many as
    # fit in the data set when two are taken at a time
    per_rank = (DIGITS_TRAIN // (2 * BATCH)) * BATCH
    assert record['distributed']['train_samples_per_rank'] == [per_rank, per_rank]
    assert record['epochs'][0]['train_samples_per_rank'] == [per_rank, per_rank]
    # evaluation gathered both halves, without the samples duplicated to even out the last batch
    assert record['epochs'][0]['eval_samples'] == DIGITS_VAL
    assert record['epochs'][0]['eval_top1'] > 10  # one short epoch: better than chance
    # one set of files, written by the main process: one summary line, one record, one model per checkpoint
    assert result.stdout.count('epoch 1/1  train_loss') == 1
    assert sorted(p.name for p in out.iterdir()) == ['best.safetensors', 'checkpoints', 'last.safetensors',
                                                     'run.json', 'summary.csv']
    checkpoints = list_checkpoints(out / 'checkpoints')
    updates_per_epoch = DIGITS_TRAIN // (2 * BATCH)
    assert [c.name for c in checkpoints] == [f'checkpoint-{n:09d}' for n in (20, 40, updates_per_epoch)]
    names = sorted(p.name for p in checkpoints[-1].iterdir())
    assert names.count('model.safetensors') == 1
    assert {'random_states_0.pkl', 'random_states_1.pkl'} <= set(names)  # both processes' RNGs, for resuming


@pytest.mark.slow
def test_two_cpu_processes_read_their_own_webdataset_shards(tmp_path, write_shards):
    """timm's WebDataset reader gives each process its own shards; together they see all the data, once."""
    shards = write_shards(tmp_path / 'shards', per_class=4, num_shards=2)  # 2 x 12 images per split
    out = tmp_path / 'run'
    _launch_two_processes(tmp_path, '--dataset', 'wds/toy', '--data-dir', str(shards), '--num-classes', '3',
                          '--output', str(out), '--epochs', '1', '--input-size', '3', '8', '8', '--batch-size', '4',
                          '--workers', '0')
    record = json.loads((out / 'run.json').read_text())
    assert record['distributed']['world_size'] == 2
    assert record['epochs'][0]['train_samples_per_rank'] == [12, 12]  # each its own shard, 3 batches of 4
    assert record['epochs'][0]['eval_samples'] == 24  # both processes' validation shards, added up


@pytest.mark.slow
def test_two_cpu_processes_resume_mid_epoch_exactly_with_an_ema(tmp_path):
    """Each process's EMA drifts (its BatchNorm buffers follow its own batches) while a checkpoint holds the main
    process's: the processes share the main one's at each checkpoint, so a resume continues the same run."""
    import shutil
    import torch
    from safetensors.torch import load_file
    out = tmp_path / 'run'
    args = ('--output', str(out), '--epochs', '1', '--limit-train-batches', '6', '--checkpoint-every', '2',
            '--workers', '0', '--input-size', '1', '8', '8', '--batch-size', str(BATCH), '--ema-decay', '0.9')
    _launch_two_processes(tmp_path, *args)
    expected = load_file(out / 'last.safetensors')
    expected_epochs = json.loads((out / 'run.json').read_text())['epochs']
    newest = list_checkpoints(out / 'checkpoints')[-1]
    shutil.rmtree(newest)  # as if killed before the epoch's end: the resume redoes updates 5 and 6
    result = _launch_two_processes(tmp_path, *args, '--resume', 'auto')
    assert 'resuming from' in result.stdout and 'checkpoint-000000004' in result.stdout
    got = load_file(out / 'last.safetensors')
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    got_epochs = json.loads((out / 'run.json').read_text())['epochs']
    assert [r['eval_top1'] for r in got_epochs] == [r['eval_top1'] for r in expected_epochs]
