#!/usr/bin/env python3
"""The placement study: each paper's question on Fashion-MNIST, (arm x seed) runs of train.py, with intervals.

    python benchmarks/placement_study.py --preset cpu --out study/cpu            # prints its time estimate first
    python benchmarks/placement_study.py --preset full --out study/full --shard 0/4   # one of 4 machines
    python benchmarks/placement_study.py --preset full --out study/full --merge-only  # tables and figures

Every run is `train.py` itself, as a subprocess, in its own folder `OUT/runs/<arm>-<hash>-s<seed>/` with
`--resume auto`: a killed study, started again, continues each unfinished run from its last checkpoint and never
redoes a finished one (a run.json whose status is 'finished' or 'stopped: ...' and whose epochs are all there).
`--shard i/n` takes every n-th run of the sorted grid, so n processes or machines share out the grid without
overlap; `--merge-only` reads whatever run folders exist and writes the results:

    results.json   every run's numbers, per-arm mean/std/n, every comparison with its 95% interval and p value
    results.md     one table per question (mean ± std over seeds, n) and the comparisons, in words
    *.png          accuracy per arm with every seed's point; for Li et al.: accuracy before/after BN
                   recalibration, and variance shift against accuracy

Analyses from a finished run's weights: for Li et al.'s arms, analysis.json (variance shift, top-1 before and
after BN recalibration, last.safetensors); for Kim et al.'s arms, spread.json (the mean per-image std of the
logits over 8 dropout masks on 1,000 test images, eval mode but for the dropout, best.safetensors): the
"more stable output" of head dropout before global pooling, compared with Welch between 'kim' and 'head_after_pool'.

A comparison is the difference of two arms' means with a 95% interval from Welch's t-test (unequal variances);
when the interval contains 0 the table says "no significant difference". The arms of every question are data
(`QUESTIONS`), all on the CIFAR ResNet-20 skeleton with one input channel (`cifar_resnet20`, `placement=`),
trained by the `fashion_mnist_resnet20` recipe (ours) with the preset's epochs and training-set share.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's timm_ic, also when run from elsewhere

from timm_ic._atomic import atomic_file, write_json_atomic  # noqa: E402
from timm_ic.placement import Placement  # noqa: E402
from timm_ic.run_record import RunRecord, RunRecordError  # noqa: E402

RECIPE = 'fashion_mnist_resnet20'
MODEL = 'cifar_resnet20'


@dataclass(frozen=True)
class Arm:
    """One setting: the placement of the ResNet-20 skeleton and any train.py flags beyond the preset's."""
    placement: str
    flags: Tuple[str, ...] = ()
    lr: Optional[float] = None  # None: the preset's (scaled with the batch size when `batch_size` is set)
    batch_size: Optional[int] = None

    def train_args(self, preset: 'Preset') -> List[str]:
        batch = self.batch_size or preset.batch_size
        lr = self.lr if self.lr is not None else preset.lr * batch / preset.batch_size  # linear scaling rule
        args = ['--model', MODEL, '--placement', self.placement, '--batch-size', str(batch), '--lr', repr(lr)]
        if preset.images_per_epoch:
            args += ['--limit-train-batches', str(max(preset.images_per_epoch // batch, 1))]
        return args + list(self.flags)


@dataclass
class Question:
    title: str
    paper: str
    arms: Dict[str, Arm]
    comparisons: List[Tuple[str, str]]  # (a, b): the difference a - b
    metrics: Tuple[str, ...] = ('top1', 'gap', 'epochs_to_target')
    analysis: bool = False  # variance shift and accuracy after BN recalibration, from the run's weights
    spread: bool = False  # logit spread over dropout masks (Kim et al.'s "more stable output"), from best weights
    lr_sweep: Dict[str, List[str]] = field(default_factory=dict)  # group -> arms in increasing lr
    export: Tuple[str, ...] = ()  # arms whose best run is exported for `timm.create_model('local-dir:...')`
    init_signal: bool = False  # signal-propagation probes of each run's model at initialisation (Lubana et al.)


def _lr_arms(prefix: str, placement: str, lrs: Sequence[float]) -> Dict[str, Arm]:
    return {f'{prefix}@lr{lr:g}': Arm(placement, lr=lr) for lr in lrs}


# The grouped norms (GN, EvoNorm-S0) get an explicit group size 8: 2/4/8 groups on ResNet-20's widths 16/32/64.
# The package's default (up to 32 groups) would give group size 1 at widths 16 and 32, InstanceNorm in all but
# name, and Lubana et al. find the behaviour depends on the group size; 8 is the largest size that still leaves
# at least 2 groups at width 16 and keeps GN and EvoNorm-S0 comparable. 'in' is the group-size-1 arm.
GROUP_SIZE = 8
NORMS = {'bn': 'post', 'gn': f'post:norm=groupnorm,group_size={GROUP_SIZE}', 'ln': 'post:norm=layernorm',
         'in': 'post:norm=instancenorm', 'frn': 'post:norm=frn', 'evonorm_b0': 'post:norm=evonorm_b0',
         'evonorm_s0': f'post:norm=evonorm_s0,group_size={GROUP_SIZE}', 'vn': 'post:norm=variancenorm',
         'ws': 'post:norm=none,conv=ws'}
IOFFE_LRS = (0.1, 0.4, 1.6)
# Lubana et al.'s probes at initialisation (`analyse_init_signal`): residual-stream variance growth (last block
# output over first), and at the last block output the mean cosine similarity between samples and the stable
# rank; the gradient norm at the first conv output over that at the last
INIT_SIGNAL_METRICS = ('stream_variance_growth', 'cosine_similarity_last', 'stable_rank_last', 'grad_norm_ratio')


def build_questions(norms: Sequence[str] = tuple(NORMS), lrs: Sequence[float] = IOFFE_LRS,
                    small_batch_norms: Optional[Sequence[str]] = None) -> Dict[str, Question]:
    """The five questions, one per paper, as data. `norms`, `lrs` and `small_batch_norms` (those also run at
    batch 8; default all of `norms`) let a preset take a subset. Learning rates scale with the batch size."""
    small = list(norms if small_batch_norms is None else small_batch_norms)
    lubana_arms = {f'{n}@b64': Arm(NORMS[n], batch_size=64) for n in norms}
    lubana_arms.update({f'{n}@b8': Arm(NORMS[n], batch_size=8) for n in small})
    lubana_cmp = [(f'{n}@b64', 'bn@b64') for n in norms if n != 'bn']
    lubana_cmp += [(f'{n}@b8', 'bn@b8') for n in small if n != 'bn' and 'bn' in small]
    lubana_cmp += [(f'{n}@b8', f'{n}@b64') for n in small]
    return {
        'chen': Question(
            'IC layer vs pre- and post-activation', 'Chen et al. 2019 (arXiv 1905.05928)',
            {'ic': Arm('ic'), 'pre': Arm('pre'), 'post': Arm('post')},
            [('ic', 'post'), ('ic', 'pre'), ('pre', 'post')], export=('ic',)),
        'kim': Question(
            'where the dropout of a residual branch goes', 'Kim et al. 2023 (arXiv 2302.06112)',
            {'kim': Arm('kim'), 'every_unit': Arm('kim:drop_units=all'),
             'before_last_bn': Arm('kim:order=drop-norm-act-conv'), 'head_after_pool': Arm('kim:head=after_pool')},
            [('kim', 'every_unit'), ('kim', 'before_last_bn'), ('kim', 'head_after_pool')],
            metrics=('top1', 'gap', 'epochs_to_target', 'logit_spread'), spread=True, export=('kim',)),
        'li': Question(
            'dropout before BN vs after it, and Uout', 'Li et al. 2019 (arXiv 1801.05134)',
            {'before_bn': Arm('before_bn'), 'after_bn': Arm('after_bn'),
             'uout_before_bn': Arm('before_bn:drop=uout,beta=0.2')},
            [('after_bn', 'before_bn'), ('uout_before_bn', 'before_bn'), ('after_bn', 'uout_before_bn')],
            metrics=('top1', 'top1_recalibrated', 'recalibration_gain', 'variance_shift'), analysis=True,
            export=('uout_before_bn',)),
        'ioffe': Question(
            'BN vs no normalization: speed and the largest lr that trains', 'Ioffe & Szegedy 2015 (arXiv 1502.03167)',
            {**_lr_arms('bn', 'post', lrs), **_lr_arms('none', 'post:norm=none', lrs)},
            [('bn@lr0.1', 'none@lr0.1')] if 0.1 in lrs else [],
            lr_sweep={'bn': [f'bn@lr{lr:g}' for lr in lrs], 'none': [f'none@lr{lr:g}' for lr in lrs]}),
        'lubana': Question(
            'the normalizer zoo at batch 64 and 8', 'Lubana et al. 2021 (arXiv 2106.05956)',
            lubana_arms, lubana_cmp, metrics=('top1',) + INIT_SIGNAL_METRICS, init_signal=True),
    }


@dataclass
class Preset:
    epochs: int
    seeds: int
    images_per_epoch: Optional[int]  # None: every training image each epoch; else batches drawn from all 60k
    target: float  # top-1 (%) for "epochs to target"
    trains_above: float  # a run "trains" when its final top-1 exceeds this (%; chance is 10%)
    batch_size: int = 128
    lr: float = 0.1
    workers: int = 4
    norms: Tuple[str, ...] = tuple(NORMS)
    small_batch_norms: Optional[Tuple[str, ...]] = None  # None: every one of `norms`
    lrs: Tuple[float, ...] = IOFFE_LRS
    questions: Tuple[str, ...] = ('chen', 'kim', 'li', 'ioffe', 'lubana')
    note: str = ''


PRESETS = {
    # a 2-core CPU machine, about 90 minutes when idle (the estimate is printed before it starts): 5,120 images
    # per epoch drawn from all 60,000, 3 epochs, 3 seeds; the normalizer zoo and the lr sweep cut down
    'cpu': Preset(epochs=3, seeds=3, images_per_epoch=5120, target=75.0, trains_above=50.0, workers=0,
                  norms=('bn', 'gn', 'frn', 'ws'), small_batch_norms=('bn', 'gn'), lrs=(0.1, 1.6),
                  note='short runs far from convergence: differences are those of early training'),
    # one GPU: the whole training set, 30 epochs, 5 seeds
    'full': Preset(epochs=30, seeds=5, images_per_epoch=None, target=92.0, trains_above=50.0, workers=4),
    # the test suite's: two arms, one epoch of a few batches
    'tiny': Preset(epochs=1, seeds=2, images_per_epoch=16, target=15.0, trains_above=10.0, batch_size=8, workers=0,
                   questions=('tiny',)),
}


def questions_for(preset: Preset) -> Dict[str, Question]:
    if preset.questions == ('tiny',):
        return {'tiny': Question('two arms (test grid)', 'none', {'post': Arm('post'), 'pre': Arm('pre')},
                                 [('pre', 'post')], analysis=True, spread=True, export=('pre',), init_signal=True,
                                 metrics=('top1', 'gap', 'epochs_to_target', 'top1_recalibrated', 'variance_shift',
                                          'logit_spread', 'stream_variance_growth'))}
    return {k: v for k, v in build_questions(preset.norms, preset.lrs, preset.small_batch_norms).items()
            if k in preset.questions}


# ---------------------------------------------------------------------------------------------------------------
# the grid: unique runs, sorted, shardable

@dataclass(frozen=True)
class Run:
    name: str  # folder name: <arm>-<hash of its train.py arguments>-s<seed>
    args: Tuple[str, ...]  # train.py arguments, without output/resume/seed
    seed: int


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.@-]+', '_', text)[:40]


def arm_args(preset: Preset, arm: Arm, extra_args: Sequence[str] = ()) -> Tuple[str, ...]:
    """train.py's arguments for an arm (without output, resume and seed): the run's identity."""
    common = ['--recipe', RECIPE, '--epochs', str(preset.epochs), '--workers', str(preset.workers)]
    return tuple(common + list(extra_args) + arm.train_args(preset))


def build_grid(preset: Preset, extra_args: Sequence[str] = ()) -> List[Run]:
    """Every (arm x seed) run, each once even when several questions share an arm, sorted by name."""
    runs: Dict[Tuple[Tuple[str, ...], int], Run] = {}
    for question in questions_for(preset).values():
        for arm_name, arm in question.arms.items():
            args = arm_args(preset, arm, extra_args)
            digest = hashlib.sha1(json.dumps(args).encode()).hexdigest()[:8]
            for seed in range(preset.seeds):  # the first question's arm name names a shared run
                runs.setdefault((args, seed), Run(f'{_slug(arm_name)}-{digest}-s{seed}', args, seed))
    return sorted(runs.values(), key=lambda r: r.name)


def parse_shard(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r'(\d+)/(\d+)', text or '')
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f'--shard {text!r}: give i/n with 0 <= i < n, e.g. 0/4')
    return int(match.group(1)), int(match.group(2))


def shard(runs: Sequence[Run], index: int, count: int) -> List[Run]:
    """Every `count`-th run from `index`: the shards of one grid partition it."""
    return list(runs[index::count])


def read_record(folder: Path) -> Optional[RunRecord]:
    """The run's run.json through the package's typed reader; None when it is missing or refused (another
    schema, half written): the run counts as not done and train.py's --resume auto deals with the folder."""
    try:
        return RunRecord.read(folder / 'run.json')
    except (OSError, RunRecordError):
        return None


def is_done(record: Optional[RunRecord], epochs: int) -> bool:
    """A run that finished all its epochs, or that train.py stopped for good (a non-finite loss is a result)."""
    if record is None:
        return False
    return record.status.startswith('stopped') or (record.status == 'finished' and len(record.epochs) >= epochs)


# ---------------------------------------------------------------------------------------------------------------
# running

def train_command(run: Run, folder: Path, data_dir: Optional[str]) -> List[str]:
    cmd = [sys.executable, str(REPO / 'train.py'), *run.args, '--seed', str(run.seed), '--output', str(folder),
           '--resume', 'auto', '--log-interval', '50']
    return cmd + (['--data-dir', data_dir] if data_dir else [])


def execute(runs: Sequence[Run], out: Path, preset: Preset, data_dir: Optional[str], analyse: Dict[str, bool],
            log=print, spread: Optional[Dict[str, bool]] = None) -> Dict[str, int]:
    """Run what is not done yet, one after the other; returns counts of skipped / run / failed. `analyse` and
    `spread` name the runs that get `analyse_run` (analysis.json) and `analyse_spread` (spread.json)."""
    counts = dict(skipped=0, ran=0, failed=0)
    spread = spread or {}

    def analyses(folder: Path) -> None:
        if analyse.get(folder.name) and not (folder / 'analysis.json').is_file():
            analyse_run(folder, data_dir)
        if spread.get(folder.name) and not (folder / 'spread.json').is_file():
            analyse_spread(folder, data_dir)

    for i, run in enumerate(runs):
        folder = out / 'runs' / run.name
        if is_done(read_record(folder), preset.epochs):
            counts['skipped'] += 1
            analyses(folder)
            continue
        log(f'[{i + 1}/{len(runs)}] {run.name}')
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(folder / 'train.log', 'a') as logfile:
            code = subprocess.call(train_command(run, folder, data_dir), stdout=logfile, stderr=subprocess.STDOUT,
                                   cwd=REPO)
        record = read_record(folder)
        if code not in (0, 3) or not is_done(record, preset.epochs):
            counts['failed'] += 1
            log(f'  failed (exit {code}); see {folder / "train.log"}')
            if code == 2:  # bad input is the same for every run: stop at once
                tail = (folder / 'train.log').read_text().strip().splitlines()[-1:]
                raise SystemExit(f'train.py refused the options: {tail[0] if tail else ""}')
            continue
        counts['ran'] += 1
        log(f'  {record.status} in {time.perf_counter() - start:.0f} s, '
            f'top-1 {final_top1(record)}')
        analyses(folder)
    return counts


def final_top1(record: RunRecord) -> Optional[float]:
    """The last epoch's test top-1; None for a run train.py stopped (non-finite loss): it did not train."""
    if record.status.startswith('stopped') or not record.epochs or record.epochs[-1].get('eval_top1') is None:
        return None
    return float(record.epochs[-1]['eval_top1'])


def run_model(folder: Path, record: RunRecord, weights: str) -> 'torch.nn.Module':
    """The run's model, as its run.json records it, with `folder / weights` loaded exactly."""
    from timm_ic.models import create_model
    return create_model(record.model, weights=folder / weights, **record.model_args)


def run_datasets(record: RunRecord, data_dir: Optional[str], data_config: Optional[Dict[str, Any]] = None):
    """(train, test) sets of the run's data with the eval transform of `data_config` (default: the run's)."""
    from timm.data import create_transform

    from timm_ic.training.data import build_datasets
    dataset = record.dataset
    train_ds, test_ds, _ = build_datasets(dataset['name'], data_dir or dataset.get('data_dir'), dataset['train_split'],
                                          dataset['val_split'], input_img_mode='L' if record.in_chans == 1 else 'RGB')
    train_ds.transform = test_ds.transform = create_transform(**(data_config or record.data_config),
                                                              is_training=False)
    return train_ds, test_ds


def analyse_run(folder: Path, data_dir: Optional[str], num_batches: int = 8, batch_size: int = 128) -> Dict[str, Any]:
    """Variance shift of the final weights, and test accuracy before and after BN recalibration (Li et al.),
    written to analysis.json. Training images with the eval transform, as `timm-ic diagnose` reads them."""
    import torch

    import timm_ic  # noqa: F401
    from timm_ic.diagnostics import recalibrate_bn, variance_shift
    from timm_ic.diagnostics import running_stat_norms

    record = read_record(folder)
    result: Dict[str, Any] = {'weights': 'last.safetensors', 'num_batches': num_batches, 'batch_size': batch_size}
    if record is None or record.status.startswith('stopped') or not (folder / 'last.safetensors').is_file():
        result['skipped'] = 'no final weights (the run did not finish)'
        write_json_atomic(folder / 'analysis.json', result)
        return result
    model = run_model(folder, record, 'last.safetensors').eval()
    train_ds, test_ds = run_datasets(record, data_dir)
    # two disjoint sets of training images: one to recalibrate on, one held out to measure the shift after it
    batch_size = min(batch_size, len(train_ds) // 2)  # tiny test data
    num_batches = min(num_batches, len(train_ds) // (2 * batch_size))
    result.update(num_batches=num_batches, batch_size=batch_size, shift_after_measured_on='held-out batches')
    chosen = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))[:2 * num_batches * batch_size]
    train_loader, heldout_loader = (
        torch.utils.data.DataLoader(torch.utils.data.Subset(train_ds, part.tolist()), batch_size=batch_size,
                                    drop_last=True) for part in chosen.chunk(2))
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=256)

    def accuracy() -> float:
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        return 100.0 * correct / total

    with torch.no_grad():
        result['top1'] = accuracy()
        if running_stat_norms(model):
            result['variance_shift'] = variance_shift(model, train_loader, num_batches).mean_shift
            recalibrate_bn(model, train_loader, num_batches)
            result['variance_shift_recalibrated'] = variance_shift(model, heldout_loader, num_batches).mean_shift
            result['top1_recalibrated'] = accuracy()
    write_json_atomic(folder / 'analysis.json', result)
    return result


def analyse_init_signal(folder: Path, record: RunRecord, data_dir: Optional[str], num_batches: int = 4) -> Dict[str, Any]:
    """Lubana et al.'s signal-propagation probes on the run's model at initialisation (its seed, its batch size,
    train mode; no zero-initialised residual branches, as `timm-ic diagnose` measures init), written to
    init_signal.json: `INIT_SIGNAL_METRICS`. Training images with the eval transform."""
    import torch

    from timm_ic.diagnostics.signal import BLOCK_PROBE, LAYER_PROBE, signal_propagation
    from timm_ic.models import create_model

    seed, batch_size = int(record.args.get('seed', 0)), int(record.args['batch_size'])
    torch.manual_seed(seed)
    model = create_model(record.model, zero_init_last=False, **record.model_args)
    train_ds, _ = run_datasets(record, data_dir)
    batch_size = min(batch_size, len(train_ds))
    num_batches = min(num_batches, len(train_ds) // batch_size)
    chosen = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed))[:num_batches * batch_size]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_ds, chosen.tolist()), batch_size=batch_size)
    signal = signal_propagation(model, loader, num_batches=num_batches, mode='train')
    blocks, convs = signal.at(BLOCK_PROBE), signal.at(LAYER_PROBE)
    result = dict(seed=seed, batch_size=batch_size, num_batches=num_batches, zero_init_last=False, mode='train',
                  stream_variance_growth=blocks[-1].activation_variance / blocks[0].activation_variance,
                  cosine_similarity_last=blocks[-1].cosine_similarity, stable_rank_last=blocks[-1].stable_rank,
                  grad_norm_ratio=convs[0].grad_norm / convs[-1].grad_norm)
    write_json_atomic(folder / 'init_signal.json', result)
    return result


def logit_spread(model, images, masks: int = 8, batch_size: int = 250) -> float:
    """Mean over images of the per-image std of the logits over `masks` dropout masks (std over masks of each
    logit, averaged over the classes): the model in eval mode (BN with its running statistics) except its dropout
    modules, which draw a fresh mask each pass. 0 for a model without dropout. The model is left in eval mode.
    Kim et al.'s head argument: dropout before global pooling is averaged over H*W positions, so the same rate
    moves the logits less than dropout after pooling."""
    import torch
    from torch import nn
    from timm_ic.layers import Uout

    model.eval()
    drops = [m for m in model.modules() if isinstance(m, (nn.modules.dropout._DropoutNd, Uout))]
    for m in drops:
        m.train()
    try:
        stds = []
        with torch.no_grad():
            for chunk in torch.split(images, batch_size):
                logits = torch.stack([model(chunk).float() for _ in range(masks)])  # masks x images x classes
                stds.append(logits.std(dim=0).mean(dim=1))
        return float(torch.cat(stds).mean())
    finally:
        model.eval()


def analyse_spread(folder: Path, data_dir: Optional[str], num_images: int = 1000, masks: int = 8,
                   seed: int = 0) -> Dict[str, Any]:
    """`logit_spread` of the run's best.safetensors on the first `num_images` test images (eval transform),
    masks drawn from torch seed `seed`; written to spread.json."""
    import torch

    import timm_ic  # noqa: F401

    record = read_record(folder)
    result: Dict[str, Any] = {'weights': 'best.safetensors', 'masks': masks, 'seed': seed}
    if record is None or record.status.startswith('stopped') or not (folder / 'best.safetensors').is_file():
        result['skipped'] = 'no best weights (the run did not finish)'
        write_json_atomic(folder / 'spread.json', result)
        return result
    model = run_model(folder, record, 'best.safetensors')
    _, test_ds = run_datasets(record, data_dir)
    n = min(num_images, len(test_ds))
    images = torch.stack([test_ds[i][0] for i in range(n)])
    torch.manual_seed(seed)
    result.update(num_images=n, logit_spread=logit_spread(model, images, masks))
    write_json_atomic(folder / 'spread.json', result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# statistics

def mean_std(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and sample standard deviation (None where undefined, so results.json stays strict JSON)."""
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return dict(mean=mean, std=std, n=n, values=list(values))


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Optional[Dict[str, Any]]:
    """mean(a) - mean(b) with its Welch interval (unequal variances, Welch-Satterthwaite degrees of freedom) and
    two-sided p value; None when either side has fewer than 2 values. Equal constant samples: a zero-width
    interval, significant when the means differ."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = mean_std(a), mean_std(b)
    diff = sa['mean'] - sb['mean']
    va, vb = sa['std'] ** 2 / sa['n'], sb['std'] ** 2 / sb['n']
    se = math.sqrt(va + vb)
    if se == 0:
        return dict(diff=diff, low=diff, high=diff, p=0.0 if diff else 1.0, df=None,
                    significant=diff != 0, confidence=confidence)
    df = (va + vb) ** 2 / (va ** 2 / (sa['n'] - 1) + vb ** 2 / (sb['n'] - 1))
    t = diff / se
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    p = 2 * stats.t.sf(abs(t), df)
    return dict(diff=diff, low=diff - half, high=diff + half, p=p, df=df, t=t,
                significant=bool(diff - half > 0 or diff + half < 0), confidence=confidence)


# ---------------------------------------------------------------------------------------------------------------
# results

def run_metrics(record: RunRecord, analysis: Optional[Dict[str, Any]], target: float,
                spread: Optional[Dict[str, Any]] = None, init_signal: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    epochs = record.epochs
    stopped = record.status.startswith('stopped')
    reached = next((e['epoch'] for e in epochs if e.get('eval_top1') is not None and e['eval_top1'] >= target), None)
    last = epochs[-1] if epochs else {}
    metrics = {
        'top1': final_top1(record),
        'best_top1': max((e['eval_top1'] for e in epochs), default=None),
        # evaluation loss minus training loss (the training loss is with dropout and augmentation on)
        'gap': (last['eval_loss'] - last['train_loss']) if last and not stopped else None,
        'epochs_to_target': reached,
        'stopped': stopped,
        'train_s': sum(e.get('epoch_time_s') or 0 for e in epochs),
        'train_samples': (record.dataset or {}).get('train_samples'),
        'eval_samples': last.get('eval_samples'),
    }
    if analysis and 'skipped' not in analysis:
        metrics.update({k: analysis.get(k) for k in ('variance_shift', 'variance_shift_recalibrated',
                                                      'top1_recalibrated')})
        if analysis.get('top1_recalibrated') is not None:
            metrics['recalibration_gain'] = analysis['top1_recalibrated'] - analysis['top1']
    if spread and 'skipped' not in spread:
        metrics['logit_spread'] = spread.get('logit_spread')
    if init_signal:
        metrics.update({k: init_signal.get(k) for k in INIT_SIGNAL_METRICS})
    return metrics


METRIC_WORDS = {'top1': 'test top-1 (%)', 'gap': 'eval - train loss', 'epochs_to_target': 'epochs to target',
                'top1_recalibrated': 'top-1 after BN recal. (%)', 'recalibration_gain': 'recal. gain (points)',
                'variance_shift': 'variance shift', 'logit_spread': 'logit std over dropout masks',
                'largest_lr': 'largest lr that trains', 'stream_variance_growth': 'init: stream variance growth',
                'cosine_similarity_last': 'init: cosine similarity (last block)',
                'stable_rank_last': 'init: stable rank (last block)', 'grad_norm_ratio': 'init: grad norm first/last conv'}


@dataclass(frozen=True)
class Claim:
    """A paper's claim as one comparison of the study: `a` minus `b` on `metric` should have the sign `sign`
    (+1: a larger). `source` says where the claim comes from (../shared/notes/papers.md, or 'ours' for an
    expectation no listed finding states)."""
    question: str
    a: str
    b: str
    metric: str
    sign: int
    text: str
    source: str = 'papers.md'


CLAIMS = (
    Claim('chen', 'ic', 'post', 'top1', +1, 'the IC layer (ReLU-BN-Dropout-Conv) beats post-activation in test top-1'),
    Claim('chen', 'ic', 'pre', 'top1', +1, 'the IC layer beats pre-activation (no dropout) in test top-1'),
    Claim('chen', 'ic', 'post', 'epochs_to_target', -1, 'the IC layer reaches the target accuracy in fewer epochs'),
    Claim('kim', 'kim', 'every_unit', 'top1', +1, 'one dropout per branch, before the last weight layer, beats a '
          'dropout before every weight layer'),
    Claim('kim', 'kim', 'before_last_bn', 'top1', +1, 'dropout after the last BN beats dropout before it'),
    Claim('kim', 'kim', 'head_after_pool', 'logit_spread', -1, 'head dropout before global pooling gives a more '
          'stable output (smaller logit spread over dropout masks) than after it'),
    Claim('li', 'before_bn', 'after_bn', 'variance_shift', +1, 'dropout before BN shifts BN\'s variance more than '
          'dropout after BN'),
    Claim('li', 'after_bn', 'before_bn', 'top1', +1, 'dropout after BN beats dropout before BN in test top-1'),
    Claim('li', 'uout_before_bn', 'before_bn', 'top1', +1, 'Uout (beta 0.2) beats Bernoulli dropout before BN'),
    Claim('li', 'before_bn', 'after_bn', 'recalibration_gain', +1, 'BN recalibration helps dropout-before-BN more '
          'than dropout-after-BN'),
    Claim('ioffe', 'bn@lr0.1', 'none@lr0.1', 'top1', +1, 'BN trains faster: higher test top-1 after the same few '
          'epochs at the same lr'),
    Claim('ioffe', 'bn', 'none', 'largest_lr', +1, 'BN trains at a larger learning rate'),
    Claim('lubana', 'ws@b64', 'bn@b64', 'stream_variance_growth', +1, 'without an activation-based normalizer '
          '(weight standardisation alone), the residual stream\'s variance grows more at initialisation than with BN'),
    Claim('lubana', 'gn@b8', 'bn@b8', 'top1', +1, 'at batch 8, GroupNorm (batch-independent) beats BatchNorm',
          source='ours'),
    Claim('lubana', 'bn@b8', 'bn@b64', 'top1', -1, 'BatchNorm loses accuracy at batch 8 against batch 64',
          source='ours'),
)


def claim_verdicts(questions_out: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each of `CLAIMS` whose question ran: 'held' when the 95% interval of a - b excludes 0 on the claimed side,
    'contradicted' when it excludes 0 on the other, 'undecided' when it contains 0 or there is no interval."""
    verdicts = []
    for claim in CLAIMS:
        q = questions_out.get(claim.question)
        if q is None:
            continue
        if claim.metric == 'largest_lr':
            sweeps = q['lr_sweeps']
            if claim.a not in sweeps or claim.b not in sweeps:
                continue
            sides = [sweeps[claim.a], sweeps[claim.b]]
            values = [side['largest_lr']['values'] for side in sides]
            if any(side['missing_seeds'] for side in sides):
                verdicts.append(dict(vars(claim), verdict='undecided', why='not every run of the sweep is done',
                                     welch=None, n_a=len(values[0]), n_b=len(values[1])))
                continue
            not_reached = not all(side['every_seed'] for side in sides)
        else:
            if claim.a not in q['arms'] or claim.b not in q['arms'] or claim.metric not in q['metrics']:
                continue
            sides = [q['arms'][claim.a][claim.metric], q['arms'][claim.b][claim.metric]]
            values = [side['values'] for side in sides]
            not_reached = any(side.get('not_reached') for side in sides)
        w = None if not_reached else welch(*values)
        if w is None:
            verdict, why = 'undecided', ('not reached by every seed' if not_reached
                                         else 'no interval (fewer than 2 runs with a value)')
        elif not w['significant']:
            verdict, why = 'undecided', 'no significant difference'
        else:
            verdict = 'held' if (w['diff'] > 0) == (claim.sign > 0) else 'contradicted'
            why = 'significant'
        verdicts.append(dict(vars(claim), verdict=verdict, why=why, welch=w, n_a=len(values[0]), n_b=len(values[1])))
    return verdicts


def evaluate_export(export_dir: Path, record: RunRecord, data_dir: Optional[str]) -> Dict[str, float]:
    """The exported weights as a user gets them, `timm.create_model('local-dir:...', pretrained=True)`, with the
    data config their config.json gives, evaluated by train.py's own `evaluate` on the run's whole test set."""
    import timm
    import torch
    from accelerate import Accelerator
    from timm.data import resolve_data_config

    import timm_ic  # noqa: F401  (the architectures)
    from timm_ic.training.loop import evaluate

    model = timm.create_model(f'local-dir:{export_dir}', pretrained=True)
    _, test_ds = run_datasets(record, data_dir, resolve_data_config(model=model))  # the export's own config
    with torch.no_grad():
        return evaluate(model, torch.utils.data.DataLoader(test_ds, batch_size=256), Accelerator(cpu=True),
                        model.num_classes)


def export_best(out: Path, preset: Preset, runs_out: Dict[str, Any], questions_out: Dict[str, Any],
                data_dir: Optional[str]) -> Dict[str, Any]:
    """Each export arm's run with the best test top-1 (its best.safetensors), exported with `timm-ic export` to
    `out/export/<arm>/` and evaluated again from there (`evaluate_export`): `reloaded_top1` is what a user loading
    the folder measures, `recorded_top1` what the run recorded for those weights."""
    from timm_ic.hub.export import export

    exports: Dict[str, Any] = {}
    for qname, question in questions_for(preset).items():
        for arm in question.export:
            done = [n for n in questions_out[qname]['arms'][arm]['runs'] if runs_out[n]['best_top1'] is not None]
            if not done:
                continue
            best = max(done, key=lambda n: (runs_out[n]['best_top1'], -runs_out[n]['seed']))
            folder, target = out / 'runs' / best, out / 'export' / arm
            record = read_record(folder)
            export(folder, target)
            exports[arm] = dict(run=best, seed=runs_out[best]['seed'], placement=question.arms[arm].placement,
                                folder=target.relative_to(out).as_posix(), weights='best.safetensors',
                                recorded_top1=(record.metrics or {}).get('top1'),
                                reloaded_top1=evaluate_export(target, record, data_dir)['top1'])
    return exports


def versions() -> Dict[str, str]:
    import platform

    import timm
    import torch

    from timm_ic import __version__
    return {'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
            'timm_ic': __version__, 'machine': platform.machine(), 'cpus': str(os.cpu_count())}


def merge(out: Path, preset_name: str, preset: Preset, extra_args: Sequence[str] = (), command: Optional[str] = None,
          data_dir: Optional[str] = None, compute: bool = True) -> Dict[str, Any]:
    """results.json, results.md and the figures from the run folders that exist under `out`. With `compute`, what
    needs the data runs where it is missing: the init probes (`analyse_init_signal`) and the exports of the best
    runs (`export_best`)."""
    grid = build_grid(preset, extra_args)
    by_args: Dict[Tuple[Tuple[str, ...], int], Run] = {(r.args, r.seed): r for r in grid}
    init_signal_args = {arm_args(preset, arm, extra_args) for q in questions_for(preset).values() if q.init_signal
                        for arm in q.arms.values()}
    runs_out: Dict[str, Any] = {}
    for run in grid:
        folder = out / 'runs' / run.name
        record = read_record(folder)
        if not is_done(record, preset.epochs):
            continue
        analysis = None
        if (folder / 'analysis.json').is_file():
            analysis = json.loads((folder / 'analysis.json').read_text())
        spread = json.loads((folder / 'spread.json').read_text()) if (folder / 'spread.json').is_file() else None
        init_signal = None
        if run.args in init_signal_args and (compute or (folder / 'init_signal.json').is_file()):
            if not (folder / 'init_signal.json').is_file():
                analyse_init_signal(folder, record, data_dir)
            init_signal = json.loads((folder / 'init_signal.json').read_text())
        runs_out[run.name] = dict(seed=run.seed, status=record.status, versions=record.versions,
                                  **run_metrics(record, analysis, preset.target, spread, init_signal))
    questions_out: Dict[str, Any] = {}
    for qname, question in questions_for(preset).items():
        arms: Dict[str, Any] = {}
        for arm_name, arm in question.arms.items():
            args = arm_args(preset, arm, extra_args)
            names = [by_args[(args, s)].name for s in range(preset.seeds) if (args, s) in by_args]
            done = [runs_out[n] for n in names if n in runs_out]
            arm_out: Dict[str, Any] = {'placement': arm.placement, 'train_args': list(arm.train_args(preset)),
                                       'runs': [n for n in names if n in runs_out], 'seeds': [r['seed'] for r in done]}
            for metric in question.metrics:
                values = [r[metric] for r in done if r.get(metric) is not None]
                arm_out[metric] = mean_std(values)
                if metric == 'epochs_to_target':
                    arm_out[metric]['not_reached'] = sum(r.get(metric) is None for r in done)
            arm_out['stopped'] = sum(r['stopped'] for r in done)
            arms[arm_name] = arm_out
        comparisons = []
        for a, b in question.comparisons:
            for metric in question.metrics:
                va, vb = arms[a][metric]['values'], arms[b][metric]['values']
                not_reached = metric == 'epochs_to_target' and bool(arms[a][metric]['not_reached']
                                                                     or arms[b][metric]['not_reached'])
                # a run that never reached the target has no number: an interval over the others would be biased
                test = None if not_reached else welch(va, vb)
                comparisons.append(dict(a=a, b=b, metric=metric, n_a=len(va), n_b=len(vb), welch=test,
                                        not_reached_by_every_seed=not_reached))
        sweeps = {}
        for group, names in question.lr_sweep.items():
            per_seed: Dict[int, Optional[float]] = {}
            missing = []
            for seed in range(preset.seeds):
                if not all(_seed_run(arms[n], runs_out, seed) for n in names):
                    missing.append(seed)  # not every lr of this seed is done: no answer for it yet
                    continue
                trained = [question.arms[n].lr for n in names if _seed_top1(arms[n], runs_out, seed) is not None
                           and _seed_top1(arms[n], runs_out, seed) > preset.trains_above]
                per_seed[seed] = max(trained) if trained else None
            defined = [v for v in per_seed.values() if v is not None]
            # the statistic only where every seed has an answer: a seed where no lr trained has no number
            every_seed = not missing and len(defined) == len(per_seed) > 0
            sweeps[group] = dict(largest_lr_per_seed=per_seed, missing_seeds=missing, trains_above=preset.trains_above,
                                 lrs=[question.arms[n].lr for n in names],
                                 largest_lr=mean_std(defined if every_seed else []), every_seed=every_seed)
        lr_comparisons = []
        groups = list(sweeps)
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                both = sweeps[a]['every_seed'] and sweeps[b]['every_seed']
                lr_comparisons.append(dict(a=a, b=b, metric='largest_lr', n_a=sweeps[a]['largest_lr']['n'],
                                           n_b=sweeps[b]['largest_lr']['n'], not_reached_by_every_seed=not both,
                                           welch=welch(sweeps[a]['largest_lr']['values'],
                                                       sweeps[b]['largest_lr']['values']) if both else None))
        questions_out[qname] = dict(title=question.title, paper=question.paper, arms=arms, comparisons=comparisons,
                                    lr_sweeps=sweeps, lr_comparisons=lr_comparisons, metrics=list(question.metrics))
    train_seconds = sum(r['train_s'] for r in runs_out.values())
    provenance = dict(command=command, versions=versions(), train_seconds=train_seconds,
                      train_minutes=round(train_seconds / 60, 1),
                      run_versions=sorted({json.dumps(r['versions'], sort_keys=True) for r in runs_out.values()}))
    results = dict(schema='timm_ic.placement_study/1', preset=preset_name, settings=_preset_dict(preset),
                   model=MODEL, recipe=RECIPE, extra_train_args=list(extra_args), provenance=provenance,
                   runs_done=len(runs_out), runs_in_grid=len(grid), runs=runs_out, questions=questions_out,
                   claims=claim_verdicts(questions_out),
                   exports=export_best(out, preset, runs_out, questions_out, data_dir) if compute else {})
    write_json_atomic(out / 'results.json', results)
    with atomic_file(out / 'results.md') as tmp:
        tmp.write_text(format_markdown(results))
    plot_results(results, out)
    return results


def _seed_run(arm_out: Dict[str, Any], runs_out: Dict[str, Any], seed: int) -> Optional[Dict[str, Any]]:
    return next((runs_out[n] for n in arm_out['runs'] if runs_out[n]['seed'] == seed), None)


def _seed_top1(arm_out: Dict[str, Any], runs_out: Dict[str, Any], seed: int) -> Optional[float]:
    run = _seed_run(arm_out, runs_out, seed)
    return run['top1'] if run else None


def _preset_dict(preset: Preset) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(preset).items()}


def _fmt(stat: Dict[str, Any], digits: int = 2) -> str:
    if not stat['n']:
        return '-'
    if stat['n'] == 1:
        return f'{stat["mean"]:.{digits}f} (n=1)'
    return f'{stat["mean"]:.{digits}f} ± {stat["std"]:.{digits}f} (n={stat["n"]})'


def claim_line(c: Dict[str, Any]) -> str:
    """One claim's verdict in words, with its numbers."""
    w = c['welch']
    numbers = (f'{c["a"]} − {c["b"]} = {w["diff"]:+.3g} [{w["low"]:+.3g}, {w["high"]:+.3g}], '
               f'n = {c["n_a"]}, {c["n_b"]}' if w else f'n = {c["n_a"]}, {c["n_b"]}')
    source = ' (our expectation, not a listed finding of the paper)' if c['source'] == 'ours' else ''
    return f'**{c["verdict"]}** ({c["why"]}): {c["text"]}{source}; {METRIC_WORDS.get(c["metric"], c["metric"])}, {numbers}'


def format_markdown(results: Dict[str, Any]) -> str:
    s = results['settings']
    counts = lambda key: '/'.join(sorted({f'{r[key]:,}' for r in results['runs'].values() if r.get(key)})) or '?'
    train, test = counts('train_samples'), counts('eval_samples')
    share = f'{s["images_per_epoch"]:,} images per epoch drawn from all {train}' if s['images_per_epoch'] else \
        f'all {train} training images every epoch'
    lines = [f'# Placement study on Fashion-MNIST: preset `{results["preset"]}`', '',
             f'{results["model"]} (1 input channel) with each arm\'s placement, recipe `{results["recipe"]}` (ours), '
             f'{s["epochs"]} epochs, {share}, seeds 0..{s["seeds"] - 1}; test top-1 on all {test} test images '
             f'after the last epoch. {results["runs_done"]} of {results["runs_in_grid"]} runs done. '
             f'Mean ± sample std over seeds (n runs). Differences: 95% Welch interval; "no significant difference" '
             f'when it contains 0.' + (f' Note: {s["note"]}.' if s.get('note') else ''), '']
    for qname, q in results['questions'].items():
        lines += [f'## {q["paper"]}: {q["title"]}', '']
        header = ['arm', 'placement'] + [METRIC_WORDS.get(m, m) for m in q['metrics']]
        lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        for arm_name, arm in q['arms'].items():
            cells = [arm_name, f'`{arm["placement"]}`']
            for m in q['metrics']:
                cell = _fmt(arm[m], 3 if m in ('gap', 'variance_shift') else 4 if m == 'logit_spread' else 2)
                if m == 'epochs_to_target' and arm[m].get('not_reached'):
                    reached = arm[m]['n']
                    cell = (f'not reached by every seed ({reached} of {reached + arm[m]["not_reached"]} reached'
                            + (f': {", ".join(f"{v:g}" for v in arm[m]["values"])})' if reached else ')'))
                cells.append(cell)
            if arm.get('stopped'):
                cells[0] += f' ({arm["stopped"]} stopped: non-finite loss)'
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
        if any(m == 'epochs_to_target' for m in q['metrics']):
            lines += [f'Target for "epochs to target": {s["target"]:g}% test top-1.', '']
        for c in q['comparisons'] + q.get('lr_comparisons', []):
            w = c['welch']
            what = f'- {c["a"]} − {c["b"]}, {METRIC_WORDS.get(c["metric"], c["metric"])}: '
            if c.get('not_reached_by_every_seed'):
                lines.append(what + 'no interval: not reached by every seed')
                continue
            if w is None:
                lines.append(what + f'no interval (n = {c["n_a"]} and {c["n_b"]}; a run without a value, '
                             f'or fewer than 2 seeds)')
                continue
            verdict = 'significant' if w['significant'] else 'no significant difference'
            lines.append(what + f'{w["diff"]:+.3f} [{w["low"]:+.3f}, {w["high"]:+.3f}], Welch p = {w["p"]:.3g} '
                         f'(n = {c["n_a"]}, {c["n_b"]}): {verdict}')
        for group, sweep in q['lr_sweeps'].items():
            per_seed = ', '.join(f's{k}: {v if v is not None else "none"}' for k, v in
                                 sweep['largest_lr_per_seed'].items())
            missing = f'; seeds not done: {sweep["missing_seeds"]}' if sweep['missing_seeds'] else ''
            stat = _fmt(sweep['largest_lr'], 3) if sweep['every_seed'] else 'not reached by every seed'
            lines.append(f'- {METRIC_WORDS["largest_lr"]} (final top-1 > {sweep["trains_above"]:g}%, lrs tried '
                         f'{sweep["lrs"]}), {group}: {stat} ({per_seed}{missing})')
        lines.append('')
    if results.get('claims'):
        lines += ['## The claims', '', '"held": the 95% interval excludes 0 on the claimed side; "contradicted": it '
                  'excludes 0 on the other; "undecided": it contains 0, or there is no interval.', '']
        lines += [f'- {claim_line(c)}' for c in results['claims']] + ['']
    prov = results.get('provenance') or {}
    if prov:
        v = prov['versions']
        lines += ['## How this was made', '', f'`{prov["command"]}`' if prov.get('command') else '(command not recorded)',
                  '', f'Training time, all runs together: {prov["train_minutes"]:g} min (sum of the epochs\' times; '
                  f'start-up, evaluation and the analyses come on top). Versions: python {v["python"]}, torch '
                  f'{v["torch"]}, timm {v["timm"]}, timm_ic {v["timm_ic"]}; {v["machine"]}, {v["cpus"]} CPUs.', '']
    if results.get('exports'):
        lines += ['## Weights', '', 'The best run of each of these arms (by its best test top-1), exported with '
                  '`timm-ic export`; "reloaded" is that folder loaded with `timm.create_model(\'local-dir:...\', '
                  'pretrained=True)` and evaluated again by train.py\'s `evaluate` on the whole test set.', '',
                  '| arm | placement | run | recorded top-1 | reloaded top-1 | folder |', '|---|---|---|---|---|---|']
        for arm, e in results['exports'].items():
            lines.append(f'| {arm} | `{e["placement"]}` | {e["run"]} | {e["recorded_top1"]:.2f} | '
                         f'{e["reloaded_top1"]:.2f} | `{e["folder"]}` |')
        lines.append('')
    return '\n'.join(lines) + '\n'


def plot_results(results: Dict[str, Any], out: Path) -> List[Path]:
    """accuracy.png (every question, every seed's point); for questions with the analysis, recalibration.png and
    shift_vs_accuracy.png."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    written = []
    questions = results['questions']
    fig, axes = plt.subplots(1, len(questions), figsize=(4.5 * len(questions), 4), squeeze=False)
    for ax, (qname, q) in zip(axes[0], questions.items()):
        names = list(q['arms'])
        for i, name in enumerate(names):
            values = q['arms'][name]['top1']['values']
            ax.scatter([i] * len(values), values, s=18, alpha=0.7)
            if values:
                ax.hlines(sum(values) / len(values), i - 0.3, i + 0.3, color='k')
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=8)
        ax.set_title(f'{qname}: {q["paper"].split(" (")[0]}', fontsize=9)
        ax.set_ylabel('test top-1 (%)')
    fig.tight_layout()
    written.append(_save(fig, out / 'accuracy.png'))
    for qname, q in questions.items():
        arms = {n: a for n, a in q['arms'].items() if a.get('top1_recalibrated', {}).get('n')}
        if not arms:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for i, (name, arm) in enumerate(arms.items()):
            runs = [results['runs'][r] for r in arm['runs']]
            pairs = [(r['top1'], r['top1_recalibrated']) for r in runs if r.get('top1_recalibrated') is not None]
            for before, after in pairs:
                ax1.plot([i - 0.15, i + 0.15], [before, after], marker='o', color=f'C{i}', alpha=0.7)
            shifts = [(r['variance_shift'], r['top1']) for r in runs if r.get('variance_shift') is not None]
            if shifts:
                ax2.scatter(*zip(*shifts), label=name, color=f'C{i}')
        ax1.set_xticks(range(len(arms)), list(arms), rotation=30, ha='right', fontsize=8)
        ax1.set_ylabel('test top-1 (%): before -> after BN recalibration')
        ax2.set_xlabel('mean variance shift (final weights)')
        ax2.set_ylabel('test top-1 (%)')
        ax2.legend(fontsize=8)
        fig.suptitle(f'{qname}: {q["paper"]}', fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / f'{qname}_recalibration_and_shift.png'))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------

# An idle 2-core machine, one process, batch 128, 28x28 (/work/shared/notes/data.md and our runs): cifar_resnet20
# trains ~410 img/s, with dropout in the units ~240 img/s (x1.7), evaluates the 10,000 test images in ~8 s, and
# train.py starts in ~6 s. Batch 8 costs ~5x per image (a bare training loop under load 9: 42 img/s at batch 128,
# 7 at batch 8). Shared with 4 other jobs (load ~6), train.py ran 22 img/s (post) and 18 img/s (ic): ~10x slower.
CPU_SECONDS = dict(per_image=1 / 410, per_eval=8.0, per_start=6.0, batch8=5.0, dropout=1.7)


def estimate_seconds(runs: Sequence[Run], preset: Preset, calib: Dict[str, float] = CPU_SECONDS) -> float:
    """Rough time of `runs` on the machine `calib` was measured on: images trained, evaluations, start-ups;
    batch-8 runs and runs with dropout or Uout in the units cost `calib`'s factors more per image."""
    total = 0.0
    for run in runs:
        args = list(run.args)
        batch = int(args[args.index('--batch-size') + 1])
        limit = int(args[args.index('--limit-train-batches') + 1]) if '--limit-train-batches' in args else None
        images = (limit * batch if limit else 60000) * preset.epochs
        placement = Placement.parse(args[args.index('--placement') + 1])
        factor = (calib['batch8'] if batch <= 8 else 1.0) * (calib['dropout'] if placement.has_drop else 1.0)
        total += images * calib['per_image'] * factor + preset.epochs * calib['per_eval'] + calib['per_start']
    return total


def study_command(args: argparse.Namespace, out: Path) -> str:
    """The command that runs this study (not this process's shard or merge-only flags), paths relative to the
    repository when inside it."""
    rel = out.relative_to(REPO).as_posix() if out.is_relative_to(REPO) else str(out)
    parts = ['python', 'benchmarks/placement_study.py', '--preset', args.preset, '--out', rel]
    parts += ['--questions', *args.questions] if args.questions else []
    parts += ['--seeds', str(args.seeds)] if args.seeds else []
    parts += ['--arms', *args.arms] if args.arms else []
    parts += ['--train-args', *args.train_args] if args.train_args else []
    return shlex.join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--out', required=True, help='study folder: runs/, results.json, results.md, figures')
    parser.add_argument('--shard', type=parse_shard, default=(0, 1), metavar='I/N', help='run every N-th run from I')
    parser.add_argument('--merge-only', action='store_true', help='no training: results from the run folders there')
    parser.add_argument('--data-dir', default=None, help='passed to train.py (default: the Debian package / cache)')
    parser.add_argument('--questions', nargs='+', default=None, help='a subset of the preset\'s questions')
    parser.add_argument('--seeds', type=int, default=None, help="override the preset's seed count")
    parser.add_argument('--arms', nargs='+', default=None,
                        help='run only these arms (e.g. --arms ic --seeds 1: rerun one committed result)')
    parser.add_argument('--dry-run', action='store_true', help='print the grid and the estimate, run nothing')
    parser.add_argument('--train-args', nargs=argparse.REMAINDER, default=[],
                        help='the rest goes to every train.py run (e.g. --mixed-precision bf16)')
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.questions or args.seeds:
        unknown = set(args.questions or ()) - set(preset.questions)
        if unknown:
            parser.error(f'--questions {sorted(unknown)}: this preset has {", ".join(preset.questions)}')
        preset = Preset(**{**vars(preset), 'questions': tuple(args.questions or preset.questions),
                           'seeds': args.seeds or preset.seeds})
    out = Path(args.out).resolve()  # train.py runs from the repository root
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else None
    grid = build_grid(preset, args.train_args)
    if args.arms:
        arms = {name: arm for q in questions_for(preset).values() for name, arm in q.arms.items()}
        unknown = sorted(set(args.arms) - set(arms))
        if unknown:
            parser.error(f'--arms {unknown}: the arms of this grid are {", ".join(sorted(arms))}')
        wanted = {arm_args(preset, arms[name], args.train_args) for name in args.arms}
        grid = [run for run in grid if run.args in wanted]
    if not args.merge_only:
        mine = shard(grid, *args.shard)
        todo = [r for r in mine if not is_done(read_record(out / 'runs' / r.name), preset.epochs)]
        estimate = estimate_seconds(todo, preset)
        print(f'preset {args.preset}: {len(grid)} runs in the grid, {len(mine)} in shard {args.shard[0]}/'
              f'{args.shard[1]}, {len(todo)} still to do; estimated {estimate / 60:.0f} min on an idle 2-core CPU '
              f'(more when the machine is shared; a GPU is far faster)')
        if args.dry_run:
            for run in mine:
                print(f'  {run.name}: {" ".join(run.args)} --seed {run.seed}')
            return 0
        analysed = {arm_args(preset, arm, args.train_args) for q in questions_for(preset).values() if q.analysis
                    for arm in q.arms.values()}
        analyse = {r.name: r.args in analysed for r in grid}
        spread_args = {arm_args(preset, arm, args.train_args) for q in questions_for(preset).values() if q.spread
                       for arm in q.arms.values()}
        counts = execute(mine, out, preset, data_dir, analyse, spread={r.name: r.args in spread_args for r in grid})
        print(f'shard {args.shard[0]}/{args.shard[1]}: {counts["ran"]} run, {counts["skipped"]} already done, '
              f'{counts["failed"]} failed')
    results = merge(out, args.preset, preset, args.train_args, command=study_command(args, out), data_dir=data_dir)
    print(f'{results["runs_done"]} of {results["runs_in_grid"]} runs done; wrote {out / "results.json"}, '
          f'{out / "results.md"} and figures')
    return 0


if __name__ == '__main__':
    sys.exit(main())
