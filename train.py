#!/usr/bin/env python3
"""Train a timm model (ours or timm's) with Hugging Face Accelerate: one CPU, one GPU, many GPUs, many nodes.

    python train.py                                   # embedded digits, ic_resnet20, a few minutes on CPU
    python train.py --recipe cifar_resnet110 --data-dir /data/cifar10 --output runs/r110
    python train.py --model ic_resnet50 --data-dir /data/imagenet --recipe imagenet_resnet50 --mixed-precision bf16
    accelerate launch --multi_gpu --num_processes 8 train.py --recipe imagenet_resnet50 --data-dir /data/imagenet
    python train.py --output runs/r110 --resume auto  # continue a run, mid-epoch included

Options come from three places, later ones winning: this script's defaults, a `--recipe` (a bundled name from
`timm_ic/recipes/` or a YAML file), flags given on the command line. With no data argument and no recipe the
`digits_demo` recipe is used. `--batch-size` is per process: the global batch is
batch_size x processes x grad_accum_steps.

`--resume` continues where a checkpoint stopped, mid-epoch too: optimizer, schedule, EMA, RNG states and the
data order are restored (the tests show bit-identical final weights on CPU, one thread, no data workers), and
options that would change the run (anything but output, logging, workers and checkpointing ones, and --lr and
--clip-grad, which run.json records) are refused. Loading a checkpoint runs no code from it (safetensors, JSON,
`torch.load(weights_only=True)`); a damaged one (checksums written at save time) is named, and `--resume auto`
falls back to the newest one that verifies.

Output folder (`--output`, default `output/train/<date-time>-<model>-<data>`), written by the main process:
    checkpoints/checkpoint-<updates>/   Accelerate state, ema.safetensors, train_state.json, checksums.json;
                                        atomic, newest --checkpoint-limit kept; only finite weights are saved
    last.safetensors, best.safetensors  weights of the evaluated model (the EMA when --ema-decay > 0), atomic
    summary.csv                         one row per epoch (timm.utils.update_summary)
    run.json                            the run record below, rewritten atomically after every epoch
    logs/                               tracker output with --log-with (tensorboard, wandb, ...)

Exit codes: 0 done; 2 bad input (an option, the data, a recipe, the model, the output folder, a checkpoint),
with a message naming it and no traceback, checked before the output folder is made where possible; 3 the loss,
weights or BatchNorm statistics became non-finite (nothing non-finite is saved); 4 --push-to-hub failed after
training (the run is kept); 1 anything else (a bug: please report its traceback).

run.json schema ("schema": "timm_ic.run_record/1"); the Hub export turns it plus best.safetensors into a card:
    schema, status            "running" | "finished" | "stopped: non-finite loss" | "stopped: non-finite weights"
    stop_reason               after a stop: what became non-finite, where (absent otherwise)
    model                     timm model name given to timm.create_model
    placement                 str(model.placement) for timm-ic models, else null
    model_args                kwargs for timm.create_model besides the name (num_classes, in_chans, placement, ...)
    num_classes, in_chans, label_names (index order, or null)
    pretrained_cfg            the model's pretrained_cfg (dict)
    data_config               resolved input_size, interpolation, mean, std, crop_pct, crop_mode
    dataset                   {key ('digits' or null), name, data_dir, hub_id (hfds) , train_split, val_split,
                               train_samples, val_samples}
    recipe                    {name, path, values} or null; values include notes such as `_source`, `_unknown`
    args                      every resolved option of this script
    versions                  {python, torch, timm, accelerate, timm_ic}
    distributed               {world_size, distributed_type, mixed_precision, device,
                               train_samples_per_rank (list, summed over this run's epochs)}
    epochs                    list of {epoch (1-based), train_loss, lr, eval_loss, eval_top1, eval_top5 (percent),
                               eval_samples, train_img_per_s, epoch_time_s, train_samples_per_rank}
    metrics                   {epoch, top1, top5, loss} of the best top-1 epoch (= best.safetensors), or null
    weights                   {best, last} file names, ema (bool)
    skipped_images            unreadable-image reads skipped with --bad-images skip
    started_at, updated_at    UTC ISO times (started_at: of the run's first start, kept across resumes)
    resumes                   list of {checkpoint, num_updates, changed: {option: [before, after]}}: resumes that
                              changed --lr or --clip-grad (e.g. after a divergence)
    non_finite                dotted paths of values that were NaN or infinite, written as null (JSON has no NaN)
"""
import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import ProjectConfiguration, broadcast, broadcast_object_list, parse_flag_from_env, set_seed
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, update_summary
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

import timm_ic  # registers the timm-ic models with timm
from timm_ic.training import (
    RUN_RECORD_SCHEMA, CheckpointError, DataError, RecipeError, SeededAugmentation, build_datasets, check_num_classes,
    find_latest_checkpoint, find_resumable_checkpoint, library_versions, list_recipes, load_checkpoint, load_recipe,
    load_train_state, save_checkpoint, save_weights, verify_checkpoint, write_json_atomic,
)
from timm_ic.training.run_record import to_jsonable
from timm_ic.training.checkpoint import TRAIN_STATE_FILE
from timm_ic.training.data import BadImageError, dataset_key, default_in_chans
from timm_ic.training.recipes import recipe_path

DEFAULT_RECIPE = 'digits_demo'
# options a resumed run may change; any other difference from the checkpoint's options is refused
RESUME_MAY_CHANGE = ('output', 'resume', 'recipe', 'recipe_values', 'log_with', 'log_interval', 'workers',
                     'checkpoint_every', 'checkpoint_limit', 'push_to_hub', 'bad_images', 'cpu', 'overwrite',
                     'dataset_download')
# options a resumed run may adjust, e.g. after a divergence; run.json's `resumes` records each change
RESUME_MAY_ADJUST = ('lr', 'clip_grad')


class UsageError(ValueError):
    """An option value that cannot work; the message says which and how to fix it."""


class NonFiniteLossError(RuntimeError):
    """The training loss (`what` 'loss'), the weights or the BatchNorm statistics ('weights') became NaN or
    infinite."""

    def __init__(self, message: str, what: str = 'loss'):
        super().__init__(message)
        self.what = what


class PushError(RuntimeError):
    """--push-to-hub failed after training; the output folder is complete."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--recipe', default=None,
                        help=f'named recipe ({", ".join(list_recipes())}) or a YAML file; flags override it')

    group = parser.add_argument_group('data')
    group.add_argument('--data-dir', default=None, help='ImageNet-layout folder (train/ and val/ class folders), '
                       'or the root of hfds/ caches and wds/ shards; none: the embedded digits')
    group.add_argument('--dataset', default='', help='digits | folder | hfds/NAME | wds/NAME | torch/NAME '
                       '(torchvision: fashion_mnist, mnist, kmnist, cifar10, cifar100)')
    group.add_argument('--dataset-download', action='store_true',
                       help='torch/NAME: let torchvision download the data into --data-dir (default '
                       '~/.cache/timm_ic/data; needs a network)')
    group.add_argument('--train-split', default='train')
    group.add_argument('--val-split', default='validation')
    group.add_argument('--input-key', default=None, help="hfds/wds image field (e.g. 'img' for CIFAR on the Hub)")
    group.add_argument('--target-key', default=None, help='hfds/wds label field')
    group.add_argument('--bad-images', choices=('fail', 'skip'), default='fail',
                       help='on an unreadable image: stop with its name, or skip it and count it')
    group.add_argument('--workers', type=int, default=4, help='data-loading worker processes per process')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    group.add_argument('--img-size', type=int, default=None)
    group.add_argument('--crop-pct', type=float, default=None)
    group.add_argument('--mean', type=float, nargs='+', default=None)
    group.add_argument('--std', type=float, nargs='+', default=None)
    group.add_argument('--interpolation', default=None)

    group = parser.add_argument_group('augmentation and regularisation')
    group.add_argument('--no-aug', action='store_true')
    group.add_argument('--scale', type=float, nargs=2, default=None, help='random-resized-crop area range')
    group.add_argument('--ratio', type=float, nargs=2, default=None, help='random-resized-crop aspect range')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.0)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--aa', default=None, help='timm auto-augment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--reprob', type=float, default=0.0, help='random-erasing probability')
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    group.add_argument('--mixup', type=float, default=0.0, help='Mixup alpha (0: off)')
    group.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha (0: off)')
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    group.add_argument('--drop-rate', type=float, default=None, help="the model's drop_rate kwarg")
    group.add_argument('--ema-decay', type=float, default=0.0, help='ModelEmaV3 decay (0: no EMA)')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='ic_resnet20', help='any timm model name, timm-ic ones included')
    group.add_argument('--placement', default=None,
                       help="timm-ic placement, e.g. 'ic:drop=uout,beta=0.1'; '' keeps the model's own. A "
                            "recipe's placement applies to the recipe's model and to skeleton-only ones (cifar_*)")
    group.add_argument('--pretrained', action='store_true', help='start from the Hub weights of --model')
    group.add_argument('--initial-weights', default=None, help='start from this .safetensors file')
    group.add_argument('--num-classes', type=int, default=None,
                       help='must match the data; with --pretrained the classifier is re-initialised')
    group.add_argument('--in-chans', type=int, default=None, help='default: 1 for the digits, else 3')

    group = parser.add_argument_group('optimisation')
    group.add_argument('--epochs', type=int, default=10)
    group.add_argument('--batch-size', type=int, default=128, help='per process')
    group.add_argument('--grad-accum-steps', type=int, default=1)
    group.add_argument('--opt', default='sgd', help="timm optimizer: sgd (Nesterov), momentum, adamw, ...")
    group.add_argument('--lr', type=float, default=0.1)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=1e-4)
    group.add_argument('--clip-grad', type=float, default=None, help='gradient-norm clipping (off by default)')
    group.add_argument('--sched', default='cosine', help='timm scheduler: cosine, step, multistep, ...')
    group.add_argument('--warmup-epochs', type=float, default=0)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=0.0)
    group.add_argument('--decay-epochs', type=float, default=None, help="'step': decay every this many epochs")
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], help="'multistep'")
    group.add_argument('--decay-rate', type=float, default=0.1)

    group = parser.add_argument_group('hardware')
    group.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16', 'fp8'), default=None,
                       help="default: accelerate config's")
    group.add_argument('--channels-last', action='store_true')
    group.add_argument('--compile', action='store_true', help='torch.compile (inductor) via Accelerate')
    group.add_argument('--sync-bn', action='store_true', help='synchronise BatchNorm statistics across processes')
    group.add_argument('--cpu', action='store_true', help='run on CPU even if a GPU is there (torchrun + gloo)')
    group.add_argument('--seed', type=int, default=42)

    group = parser.add_argument_group('output, checkpoints and logging')
    group.add_argument('--output', default=None, help='output folder')
    group.add_argument('--overwrite', action='store_true',
                       help="start a new run in an --output that holds a previous run's weights and run.json")
    group.add_argument('--resume', default=None, nargs='?', const='auto',
                       help="'auto' (the default when given alone: latest checkpoint in --output, if any) or a "
                            "checkpoint / output folder")
    group.add_argument('--checkpoint-every', type=int, default=0,
                       help='also checkpoint every N optimizer updates (0: at epoch ends only)')
    group.add_argument('--checkpoint-limit', type=int, default=3, help='checkpoints kept')
    group.add_argument('--log-with', default=None, help='Accelerate trackers: tensorboard, wandb, all, ...')
    group.add_argument('--log-interval', type=int, default=20, help='progress-bar updates every N batches')
    group.add_argument('--limit-train-batches', type=int, default=None,
                       help='at most N batches per epoch (rounded down to whole --grad-accum-steps windows)')
    group.add_argument('--push-to-hub', default=None, metavar='REPO',
                       help='at the end, upload best weights and a model card (timm_ic.hub.push_run)')
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults, then the recipe, then explicit flags. Adds `recipe_values` (the recipe as read) to the result."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)  # to find the recipe and whether any data was given
    recipe = first.recipe
    if recipe is None and not first.data_dir and first.dataset in ('', 'digits'):
        recipe = DEFAULT_RECIPE
    recipe_values = None
    if recipe is not None:
        dests = {a.dest for a in parser._actions if a.dest not in ('help', 'recipe')}
        recipe_values = load_recipe(recipe, valid_keys=dests)
        # the recipe's placement is decided below, once the model is known
        parser.set_defaults(**{k: v for k, v in recipe_values.items() if not k.startswith('_') and k != 'placement'})
    args = parser.parse_args(argv)
    args.recipe = recipe
    args.recipe_values = recipe_values
    if args.placement is None and recipe_values and recipe_values.get('placement'):
        if recipe_placement_applies(args.model, recipe_values.get('model')):
            args.placement = recipe_values['placement']
    return args


def recipe_placement_applies(model: str, recipe_model: Optional[str]) -> bool:
    """A recipe's placement is for its own model, or for a skeleton-only one (whose own placement has no
    dropout, e.g. cifar_wrn28_10): a model that brings its own placement (ic_wrn28_10, uout_wrn28_10) keeps it,
    or the weights published under its name would be another network's."""
    if model == recipe_model:
        return True
    if not timm.is_model(model):
        return False
    try:
        with torch.device('meta'):  # no memory, no init cost: only the default placement is wanted
            placement = getattr(timm.create_model(model), 'placement', None)
    except Exception:  # a model that cannot be built this way is not a timm-ic skeleton
        return False
    return placement is not None and not placement.has_drop


def check_options(args: argparse.Namespace) -> None:
    """Fail fast, before anything is created, on option values that cannot work."""
    check_model_name(args.model)
    if args.grad_accum_steps < 1 or args.batch_size < 1 or args.epochs < 1:
        raise UsageError('--batch-size, --epochs and --grad-accum-steps must be at least 1.')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f'Mixup/CutMix pair samples within a batch: --batch-size must be even, not {args.batch_size}.')
    if not args.lr > 0:  # 0 would train nothing, silently
        raise UsageError(f'--lr must be greater than 0, not {args.lr:g}.')
    for name, low, high in (('warmup_lr', 0, None), ('min_lr', 0, None), ('weight_decay', 0, None),
                            ('momentum', 0, 1), ('workers', 0, None), ('checkpoint_every', 0, None),
                            ('mixup', 0, None), ('cutmix', 0, None), ('smoothing', 0, 1), ('ema_decay', 0, 1),
                            ('reprob', 0, 1), ('hflip', 0, 1), ('vflip', 0, 1)):
        value = getattr(args, name)
        if value < low or (high is not None and value > high):
            bounds = f'between {low} and {high}' if high is not None else f'at least {low}'
            raise UsageError(f'--{name.replace("_", "-")} must be {bounds}, not {value:g}.')
    for name in ('checkpoint_limit', 'log_interval'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be at least 1, not {getattr(args, name)}.')
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise UsageError(f'--clip-grad must be greater than 0 (leave it out for no clipping), not {args.clip_grad:g}.')
    if args.drop_rate is not None and not 0 <= args.drop_rate < 1:
        raise UsageError(f'--drop-rate must be at least 0 and below 1, not {args.drop_rate:g}.')
    if args.placement:
        try:
            timm_ic.Placement.parse(args.placement)
        except (ValueError, TypeError) as e:
            raise UsageError(f'--placement {args.placement!r}: {e}') from None
    if args.initial_weights:
        check_safetensors_file(args.initial_weights, '--initial-weights')
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)


def check_safetensors_file(path: str, option: str) -> None:
    """An existing, readable safetensors file, or a UsageError naming it."""
    from safetensors import SafetensorError, safe_open
    if not path.endswith('.safetensors') or not os.path.isfile(path):
        raise UsageError(f'{option} {path}: give an existing .safetensors file.')
    try:
        with safe_open(path, 'pt') as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise UsageError(f'{option} {path} is not a readable safetensors file ({e}); it may be truncated or '
                         f'another format.') from None


def check_repo_id(repo_id: str) -> None:
    """A Hub repository id `--push-to-hub` can push to, checked before training rather than after it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        if repo_id.count('/') != 1:
            raise HFValidationError('it needs a namespace: <user or org>/<name>')
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f'--push-to-hub {repo_id!r} is not a Hub repository id ({e}); give <user or org>/<name>, '
                         f'e.g. my-org/ic_resnet20-digits.') from None


def check_output_folder(output: Path) -> None:
    """The output folder is a folder (or can become one) this process can write into."""
    if output.exists() and not output.is_dir():
        raise UsageError(f'--output {output} is a file, not a folder; choose a folder.')
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f'--output {output}: {existing} is a file, so the folder cannot be made there.')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'--output {output}: {existing} is not writable by this user; choose another folder.')


def check_model_name(name: str) -> None:
    """Fail fast on a model name timm does not know, listing close matches (timm_ic.models.check_model_name)."""
    try:
        timm_ic.models.check_model_name(name)
    except timm_ic.models.UnknownModelError as e:
        raise UsageError(str(e)) from None


def model_from_args(args: argparse.Namespace, num_classes: int, in_chans: int,
                    log: Callable[[str], None]) -> Tuple[nn.Module, Dict[str, Any]]:
    """`timm_ic.models.create_model` with the command line's options, and the kwargs that rebuild it (for the
    run record).

    `--placement` reaches timm-ic models as a kwarg; `--initial-weights` loads through timm's own pretrained
    path (`pretrained_cfg_overlay=dict(file=...)`), which adapts `in_chans` and drops a classifier of another size.
    """
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans)
    if args.drop_rate is not None:
        kwargs['drop_rate'] = args.drop_rate
    pretrained = args.pretrained or bool(args.initial_weights)
    if args.initial_weights:
        check_safetensors_file(args.initial_weights, '--initial-weights')
        kwargs['pretrained_cfg_overlay'] = dict(file=os.path.abspath(args.initial_weights))
        file_classes = initial_weights_classes(args.initial_weights, args.model)
        if file_classes:  # timm keeps the file's classifier only when its size is the one asked for
            kwargs['pretrained_cfg_overlay']['num_classes'] = file_classes
    try:
        model = timm_ic.models.create_model(args.model, placement=args.placement or None, pretrained=pretrained,
                                            **kwargs)
    except timm_ic.models.PlacementError as e:
        raise UsageError(f'--placement works with timm-ic models (ic_*, cifar_*, kim_*, uout_*), not with '
                         f'{args.model!r}; for timm models use timm_ic.rewrite(model, placement) in Python.') from e
    except (OSError, ValueError, RuntimeError) as e:
        from_export = args.model.startswith(timm_ic.models.EXPORT_PREFIXES)
        if isinstance(e, RuntimeError) and (pretrained or not from_export):
            if not pretrained:
                raise
            source = args.initial_weights or f'the pretrained weights of {args.model}'
            raise UsageError(f'could not load {source}: {e}') from e
        if from_export:  # its config.json or weights
            offline = ' (HF_HUB_OFFLINE is set: only the local cache is used)' if os.environ.get(
                'HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on') else ''
            raise UsageError(f'--model {args.model}: could not load it{offline}: {type(e).__name__}: {e}') from None
        if args.placement:  # a placement that parses but cannot apply to this model
            raise UsageError(f'--placement {args.placement!r} with --model {args.model}: {e}') from None
        raise
    if args.initial_weights:
        check_initial_weights(model, args.initial_weights, args.model)
    if pretrained:
        source_classes = model.pretrained_cfg.get('num_classes')
        if source_classes and source_classes != num_classes:
            log(f'fine-tuning: the classifier is re-initialised for {num_classes} classes '
                f'(the pretrained weights have {source_classes}).')
    model_args = {k: v for k, v in kwargs.items() if k != 'pretrained_cfg_overlay'}
    if getattr(model, 'placement', None) is not None:  # the placement built, whichever option chose it
        model_args['placement'] = str(model.placement)
    return model, model_args


def _classifier_name(model_name: str) -> Optional[str]:
    cfg = timm.get_pretrained_cfg(model_name) if timm.is_model(model_name) else None
    return cfg.classifier if cfg is not None and isinstance(cfg.classifier, str) else None


def initial_weights_classes(path: str, model_name: str) -> Optional[int]:
    """Rows of the classifier in a weights file (read from its header), or None if it has none we know."""
    from safetensors import safe_open
    key = f'{_classifier_name(model_name)}.weight'
    with safe_open(path, 'pt') as f:
        return f.get_slice(key).get_shape()[0] if key in f.keys() else None


def check_initial_weights(model: nn.Module, path: str, model_name: str) -> None:
    """Refuse weights of another architecture: timm loads a file non-strictly when it drops the classifier."""
    from safetensors import safe_open
    with safe_open(path, 'pt') as f:
        file_keys = set(f.keys())
    classifier = _classifier_name(model_name) or model.pretrained_cfg.get('classifier') or ''
    differ = sorted(k for k in file_keys ^ set(model.state_dict()) if not k.startswith(f'{classifier}.'))
    if differ:
        raise UsageError(f'--initial-weights {path} does not fit --model {model_name}: {len(differ)} weight names '
                         f'differ (e.g. {", ".join(differ[:3])}); give the --model (and --placement) the file was '
                         f'trained with.')


def resolve_transforms(args: argparse.Namespace, model: nn.Module, in_chans: int) -> Tuple[Dict, Callable, Callable]:
    """Data config from the model's pretrained_cfg and the options, then timm's train / eval transforms."""
    overrides = {k: getattr(args, k) for k in ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')}
    overrides['in_chans'] = in_chans
    cfg = model.pretrained_cfg
    for key in ('mean', 'std'):  # a grey-scale input with a colour model's statistics: use their average
        if overrides[key] is None and len(cfg.get(key) or ()) not in (0, in_chans):
            overrides[key] = [sum(cfg[key]) / len(cfg[key])]
    size = cfg.get('input_size')
    if overrides['input_size'] is None and not overrides['img_size'] and size and size[0] != in_chans:
        overrides['input_size'] = (in_chans, *size[1:])  # timm takes the cfg's size whole, channels included
    data_config = resolve_data_config(overrides, model=model)
    if data_config['input_size'][0] != in_chans:
        raise UsageError(f'--input-size has {data_config["input_size"][0]} channels but the model takes {in_chans}.')
    train_kwargs: Dict[str, Any] = dict(
        is_training=True, no_aug=args.no_aug, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, re_prob=args.reprob)
    if args.scale is not None:
        train_kwargs['scale'] = tuple(args.scale)
    if args.ratio is not None:
        train_kwargs['ratio'] = tuple(args.ratio)
    train_transform = create_transform(**data_config, **train_kwargs)
    eval_transform = create_transform(**data_config, is_training=False)
    return data_config, train_transform, eval_transform


def prepare_loader(accelerator: Accelerator, loader: DataLoader, workers: int) -> DataLoader:
    """Accelerate's loader: each process takes its share of the batches, on its device.

    An iterable data set (WebDataset shards) is already split by timm's reader, which gives each process its own
    shards in equal sample counts (as timm's train.py expects): Accelerate only moves its batches to the device,
    as it would for one process, instead of splitting them again.
    """
    if not isinstance(loader.dataset, IterableDataset):
        return accelerator.prepare(loader)
    if hasattr(loader.dataset, 'set_loader_cfg'):
        loader.dataset.set_loader_cfg(num_workers=workers)  # its per-worker sample counts depend on it
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True,
                               dispatch_batches=False, non_blocking=True)


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        accelerator: Accelerator,
        lr_scheduler,
        num_updates: int,
        num_batches: int,
        start_batch: int = 0,
        start_totals: Tuple[float, int] = (0.0, 0),
        mixup_fn: Optional[Mixup] = None,
        model_ema: Optional[ModelEmaV3] = None,
        clip_grad: Optional[float] = None,
        channels_last: bool = False,
        log_interval: int = 20,
        on_update: Optional[Callable[[int, int, torch.Tensor, Tuple[torch.Tensor, int]], None]] = None,
        desc: str = '',
) -> Tuple[Dict[str, float], int]:
    """One pass over `loader` (at most `num_batches` batches, the first `start_batch` already done, with
    `start_totals` = (loss sum, samples) of those).

    Returns the epoch's metrics and the new optimizer-update count. `on_update(num_updates, batches_done,
    nonfinite, totals)` runs after every optimizer update (checkpointing); `nonfinite` counts non-finite losses
    so far, `totals` is (loss sum tensor, samples) of this process so far.
    """
    model.train()
    loss_sum = torch.full((), start_totals[0], device=accelerator.device)
    nonfinite = torch.zeros((), device=accelerator.device, dtype=torch.long)
    samples = start_samples = start_totals[1]
    batches_done = start_batch
    readout = LaggedReadout(accelerator.device)
    bar = tqdm(total=num_batches, initial=start_batch, desc=desc, dynamic_ncols=True, leave=False,
               mininterval=1.0, disable=not accelerator.is_main_process)  # one bar per job, not per node
    start = time.perf_counter()
    for inputs, targets in loader:
        if mixup_fn is not None:
            inputs, targets = mixup_fn(inputs, targets)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(model):
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            accelerator.backward(loss)
            if clip_grad is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        loss_sum += loss
        nonfinite += ~torch.isfinite(loss)  # no host sync here: read at log intervals, checked before saving
        samples += inputs.shape[0]
        batches_done += 1
        if accelerator.sync_gradients:
            num_updates += 1
            lr_scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
                model_ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=num_updates)
            if on_update is not None:
                on_update(num_updates, batches_done, nonfinite, (loss_sum, samples))
        bar.update(1)
        if batches_done % log_interval == 0 and batches_done < num_batches:  # the epoch's end checks below
            seen = readout.pop()  # the previous interval's loss and non-finite count, long since computed
            if seen is not None and seen[1] > 0:
                raise NonFiniteLossError(nonfinite_message(epoch, num_updates))
            # every process the same count (a collective), copied to the host without waiting
            readout.push(torch.stack([loss.double(), accelerator.reduce(nonfinite.clone(), reduction='sum').double()]))
            if seen is not None:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f'{seen[0]:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}',
                                img_s=f'{(samples - start_samples) * accelerator.num_processes / elapsed:.0f}',
                                refresh=False)
        if batches_done >= num_batches:  # --limit-train-batches
            break
    elapsed = time.perf_counter() - start
    bar.close()
    check_finite(accelerator, nonfinite, epoch, num_updates)
    metrics = {
        'loss': accelerator.reduce(loss_sum / max(batches_done, 1), reduction='mean').item(),
        'img_per_s': (samples - start_samples) * accelerator.num_processes / max(elapsed, 1e-9),
        'samples': samples,
        'time_s': elapsed,
    }
    return metrics, num_updates


class LaggedReadout:
    """Device values copied to the host without waiting, and read one log interval later: the training loop
    never stalls the device's queue for its progress bar and its non-finite check."""

    def __init__(self, device: torch.device):
        self.host = torch.zeros(2, dtype=torch.float64, pin_memory=device.type == 'cuda')
        self.copied = torch.cuda.Event() if device.type == 'cuda' else None
        self.pending = False

    def push(self, values: torch.Tensor) -> None:
        self.host.copy_(values, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.pending = True

    def pop(self) -> Optional[List[float]]:
        if not self.pending:
            return None
        if self.copied is not None:
            self.copied.synchronize()  # recorded an interval ago: done by now
        self.pending = False
        return self.host.tolist()


def nonfinite_message(epoch: int, num_updates: int) -> str:
    return f'the training loss became non-finite (epoch {epoch + 1}, by optimizer update {num_updates})'


def nonfinite_advice(args: argparse.Namespace, checkpoint_dir: Path) -> str:
    """What to do after a divergence: advice that works from where the run stopped."""
    lower = f'--lr {args.lr / 10:g}'
    good = find_latest_checkpoint(checkpoint_dir)
    if good is not None:
        advice = (f'continue from the last good checkpoint {good.name} with a lower learning rate or gradient '
                  f'clipping: --resume auto {lower} (or --clip-grad 1.0); these two may change on resume, and '
                  f'run.json records it')
    else:
        advice = (f'no good checkpoint was saved: start again with a lower learning rate or gradient clipping '
                  f'({lower} or --clip-grad 1.0) and --overwrite (or another --output)')
    fp16 = ' With --mixed-precision fp16, bf16 is safer (a new run).' if args.mixed_precision == 'fp16' else ''
    return f'training stopped, nothing non-finite was saved; {advice}.{fp16}'


def check_finite_state(accelerator: Accelerator, modules: Dict[str, nn.Module], epoch: int, num_updates: int) -> None:
    """Raise `NonFiniteLossError` if any floating-point parameter or buffer (BatchNorm running statistics go
    inf while the loss is still finite) is non-finite on any process, naming a few; all processes agree."""
    names, flags = [], []
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                names.append(f'{prefix}{name}')
                flags.append(torch.isfinite(tensor).all())
    bad = accelerator.reduce((~torch.stack(flags)).int(), reduction='sum').tolist()
    found = [name for name, count in zip(names, bad) if count]
    if found:
        raise NonFiniteLossError(
            f'{len(found)} weight or buffer tensor(s) became non-finite (epoch {epoch + 1}, by optimizer update '
            f'{num_updates}; e.g. {", ".join(found[:3])})', what='weights')


def check_finite(accelerator: Accelerator, nonfinite: torch.Tensor, epoch: int, num_updates: int) -> None:
    """Raise `NonFiniteLossError` if any process has seen a non-finite loss (all processes agree)."""
    if accelerator.reduce(nonfinite.clone(), reduction='sum').item() > 0:
        raise NonFiniteLossError(nonfinite_message(epoch, num_updates))


@torch.no_grad()
def sync_ema_buffers(accelerator: Accelerator, model_ema: Optional[ModelEmaV3]) -> None:
    """Give every process the main process's EMA buffers (BatchNorm running statistics).

    Each process's EMA averages its own model's buffers, which its own batches updated after DDP broadcast
    the main process's: they drift apart. A checkpoint holds the main process's EMA, so without this a resumed
    run continues from other buffers than the uninterrupted one (measured: 2 CPU processes, top-1 10.71 vs
    10.99), and evaluation would gather results of slightly different models."""
    if model_ema is None or accelerator.num_processes == 1:
        return
    buffers = list(model_ema.module.buffers())
    for buffer, synced in zip(buffers, broadcast(buffers, from_process=0)):
        if synced is not buffer:  # XLA returns new tensors; torch.distributed broadcasts in place
            buffer.copy_(synced)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, num_classes: int) -> Dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy over the whole validation set, gathered from all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss sum, top-1 hits, top-5 hits, n
    top_k = (1, min(5, num_classes))
    own_shards = isinstance(loader.dataset, IterableDataset)  # see prepare_loader: no process reads another's data
    for inputs, targets in loader:
        outputs = model(inputs)
        if not own_shards:
            # gather_for_metrics drops the samples duplicated to even out the last batch across processes
            outputs, targets = accelerator.gather_for_metrics((outputs, targets))
        n = targets.shape[0]
        top1, top5 = accuracy(outputs, targets, topk=top_k)
        totals += torch.stack([F.cross_entropy(outputs.float(), targets, reduction='sum').double(),
                               top1.double() * n / 100, top5.double() * n / 100,
                               torch.tensor(n, dtype=torch.float64, device=totals.device)])
    if own_shards:
        totals = accelerator.reduce(totals, reduction='sum')
    loss_sum, hits1, hits5, n = totals.tolist()
    n = max(n, 1)
    return {'loss': loss_sum / n, 'top1': 100 * hits1 / n, 'top5': 100 * hits5 / n, 'samples': int(n)}


def write_summary_csv(path: Path, history: List[Dict[str, Any]]) -> None:
    """summary.csv rebuilt from the run's history with timm's `update_summary`, then swapped in atomically."""
    tmp = path.with_name(f'.tmp-{path.name}')
    tmp.unlink(missing_ok=True)
    for i, row in enumerate(history):
        update_summary(row['epoch'], {'loss': row['train_loss']},
                       {'loss': row['eval_loss'], 'top1': row['eval_top1'], 'top5': row['eval_top5']},
                       filename=str(tmp), lr=row['lr'], write_header=i == 0)
    if history:
        os.replace(tmp, path)


def resolve_output_and_resume(args: argparse.Namespace) -> Tuple[Path, Optional[Path], List[str]]:
    """The output folder (the same on every process), the checkpoint to resume from, if any, and notes for
    the log (damaged checkpoints passed over). The main process verifies; every process gets its answer."""
    output = args.output
    if output is None and args.resume in (None, 'auto'):
        if args.resume == 'auto':
            raise UsageError('--resume auto needs --output DIR, the folder of the run to continue.')
        data_name = (args.dataset or ('folder' if args.data_dir else 'digits')).replace('/', '-')
        stamp = [datetime.now().strftime('%Y%m%d-%H%M%S')]
        broadcast_object_list(stamp)  # every process must agree on the folder name
        output = os.path.join('output', 'train', f'{stamp[0]}-{args.model.replace("/", "-")}-{data_name}')
    answer: List[Any] = [None]
    if PartialState().is_main_process:
        try:
            answer[0] = _find_resume_checkpoint(args, output)
        except UsageError as e:
            answer[0] = e
    broadcast_object_list(answer)
    if isinstance(answer[0], Exception):
        raise answer[0]
    output, resume_from, notes = answer[0]
    return Path(output), resume_from, notes


def _find_resume_checkpoint(args: argparse.Namespace, output: Optional[str]) -> Tuple[str, Optional[Path], List[str]]:
    resume_from, notes = None, []
    if args.resume not in (None, 'auto'):
        given = Path(args.resume)
        if (given / TRAIN_STATE_FILE).is_file():  # a checkpoint named: that one, or say why not and what else
            problem = verify_checkpoint(given)
            if problem is not None:
                older, _ = find_resumable_checkpoint(given.parent)
                hint = f'; the newest whole one there is {older}' if older else ''
                raise UsageError(f'--resume {given}: {problem}{hint}.')
            resume_from = given
        else:
            resume_from, notes = find_resumable_checkpoint(given / 'checkpoints')
            if resume_from is None:
                found = f' ({"; ".join(notes)})' if notes else ''
                raise UsageError(f'--resume {given}: no checkpoint to resume from there (looked for '
                                 f'{TRAIN_STATE_FILE} in it and for checkpoints/checkpoint-* under it){found}.')
        if output is None:
            output = str(resume_from.parent.parent)
    elif args.resume == 'auto':
        resume_from, notes = find_resumable_checkpoint(Path(output) / 'checkpoints')
        if resume_from is None and notes:
            raise UsageError(f'--resume auto: no checkpoint in {Path(output) / "checkpoints"} verifies '
                             f'({"; ".join(notes)}). Start a new run (another --output), from the last weights '
                             f'with --initial-weights {Path(output) / "last.safetensors"} if they are good.')
    if notes:
        notes = [f'skipped a damaged checkpoint: {n}' for n in notes] + [f'falling back to {resume_from}']
    check_output_folder(Path(output))
    if resume_from is None and args.resume is None and find_latest_checkpoint(Path(output) / 'checkpoints'):
        raise UsageError(f'{output} already holds checkpoints of a run: pass --resume auto to continue it, '
                         f'or choose another --output.')
    previous = [name for name in ('run.json', 'best.safetensors', 'last.safetensors') if (Path(output) / name).exists()]
    if resume_from is None and previous and not args.overwrite:
        raise UsageError(f'{output} holds a previous run ({", ".join(previous)}): pass --overwrite to replace it, '
                         f'or choose another --output.')
    return output, resume_from, notes


def _num_samples(dataset) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:  # an iterable data set without a length
        return None


def resume_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options a checkpoint must be resumed with, as they read back from JSON."""
    options = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
    return json.loads(json.dumps(to_jsonable(options)))


def check_resume_options(args: argparse.Namespace, saved: Optional[Dict[str, Any]],
                         checkpoint: Path) -> Dict[str, List[Any]]:
    """Refuse to resume with options that would make the continued run a different one; returns the
    adjustable ones (`RESUME_MAY_ADJUST`) that changed, as {option: [saved, now]}."""
    if not saved:
        return {}
    current = resume_options(args)
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    refused = [f'--{k.replace("_", "-")} {saved.get(k)!r} -> {current.get(k)!r}'
               for k in differ if k not in RESUME_MAY_ADJUST]
    if refused:
        adjustable = ', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_ADJUST)
        raise UsageError(f'{checkpoint} was saved with other options ({"; ".join(refused)}). Resume with the '
                         f'options of that run (only {adjustable} may change), or start a new run from its '
                         f'weights with --initial-weights '
                         f'{checkpoint / "model.safetensors"}.')
    return {k: [saved.get(k), current.get(k)] for k in differ}


def tracker_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Options as scalars, which is what every tracker accepts as hyper-parameters."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
            if k != 'recipe_values'}


def training_function(args: argparse.Namespace) -> Dict[str, Any]:
    """Train and evaluate as the options say; returns the run record (also written to run.json)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec='seconds')
    check_options(args)

    # the process group first (as the Accelerator would set it up), so that all processes agree on the
    # output folder, which the trackers need when the Accelerator is built
    PartialState(cpu=args.cpu or parse_flag_from_env('ACCELERATE_USE_CPU'))
    output_dir, resume_from, resume_notes = resolve_output_and_resume(args)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        log_with=args.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / 'logs')),
        # the shuffle order is a function of (seed, epoch): a resumed run sees exactly the same batches
        # non_blocking: host-to-GPU copies from the pinned loaders overlap with compute, as a hand-written loop does
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        dynamo_backend='inductor' if args.compile else None,
        step_scheduler_with_optimizer=False,  # timm schedulers are stepped by hand, per optimizer update
    )
    log = accelerator.on_main_process(print)  # once per job (accelerator.print is once per node)
    set_seed(args.seed, device_specific=True)  # per-process dropout draws; DDP copies rank 0's initial weights
    for note in resume_notes:
        log(f'--resume: {note}')

    # data
    default_chans = default_in_chans(args.dataset, args.data_dir)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else default_chans)
    img_modes = {1: 'L', 3: 'RGB', 4: 'RGBA'}
    if in_chans not in img_modes:
        raise UsageError(f'--in-chans {in_chans}: images can be read with 1, 3 or 4 channels.')
    train_ds, val_ds, label_names = build_datasets(
        args.dataset, args.data_dir, args.train_split, args.val_split, input_img_mode=img_modes[in_chans],
        bad_images=args.bad_images, seed=args.seed, batch_size=args.batch_size,
        input_key=args.input_key, target_key=args.target_key, download=args.dataset_download)
    source = args.dataset or args.data_dir or 'digits'
    num_classes = check_num_classes(args.num_classes, label_names, source)

    # model
    model, model_args = model_from_args(args, num_classes, in_chans, log)
    recipe_placement = (args.recipe_values or {}).get('placement')
    if recipe_placement and args.placement is None:
        log(f'{args.model} keeps its own placement {model_args.get("placement")}; the recipe\'s '
            f'{recipe_placement!r} is for {args.recipe_values.get("model")} (pass --placement to choose one).')
    data_config, train_ds.transform, val_ds.transform = resolve_transforms(args, model, in_chans)
    if args.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type == 'cpu':
            raise UsageError('--sync-bn needs GPU processes (PyTorch\'s SyncBatchNorm runs on GPU modules only); '
                             'drop it for CPU runs.')
        model = timm.layers.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    iterable = isinstance(train_ds, IterableDataset)
    if not iterable:  # augmentation draws from per-sample seeds: exact mid-epoch resume, any worker count
        train_ds = SeededAugmentation(train_ds, args.seed)
    loader_generator = torch.Generator().manual_seed(args.seed)  # keeps loader seeding off the global RNG
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=not iterable, drop_last=True,
                              num_workers=args.workers, persistent_workers=args.workers > 0,
                              pin_memory=accelerator.device.type == 'cuda', generator=loader_generator)
    val_loader = DataLoader(val_ds, batch_size=2 * args.batch_size, shuffle=False, num_workers=args.workers,
                            persistent_workers=args.workers > 0, pin_memory=accelerator.device.type == 'cuda',
                            generator=torch.Generator().manual_seed(args.seed))

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_loader, val_loader = (prepare_loader(accelerator, loader, args.workers)
                                for loader in (train_loader, val_loader))
    if len(train_loader) == 0:
        raise DataError(f'the training split has fewer samples than one batch per process '
                        f'({args.batch_size} x {accelerator.num_processes}); lower --batch-size.')
    num_batches = len(train_loader)
    if args.limit_train_batches and args.limit_train_batches < num_batches:
        # whole accumulation windows only: Accelerate closes a partial window at the loader's end, which a
        # limited epoch never reaches (its gradients would leak into the next epoch)
        windows = max(args.limit_train_batches // args.grad_accum_steps, 1)
        num_batches = min(windows * args.grad_accum_steps, num_batches)
    updates_per_epoch = math.ceil(num_batches / args.grad_accum_steps)
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    # the scheduler and the EMA are saved by us (JSON, safetensors), not registered with Accelerate, which
    # would pickle them and unpickle them on resume: loading a checkpoint someone sent runs no code
    model_ema = None
    if args.ema_decay > 0:
        model_ema = ModelEmaV3(accelerator.unwrap_model(model, keep_torch_compile=False), decay=args.ema_decay)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        train_loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    # where we start: a checkpoint's epoch and batch, or the beginning
    progress: Dict[str, Any] = {'epoch': 0, 'batches_done': 0, 'num_updates': 0, 'history': [], 'best': None,
                                'samples_per_rank': [0] * accelerator.num_processes, 'started_at': started_at,
                                'resumes': []}
    if resume_from is not None:
        saved = load_train_state(resume_from)
        if len(saved['samples_per_rank']) != accelerator.num_processes:
            raise UsageError(f'{resume_from} was saved by {len(saved["samples_per_rank"])} process(es); resume it '
                             f'with as many (this run has {accelerator.num_processes}).')
        adjusted = check_resume_options(args, saved.pop('options', None), resume_from)
        scheduler_state = saved.pop('scheduler', None)
        load_checkpoint(accelerator, resume_from, {'ema': model_ema.load_state_dict} if model_ema is not None else {})
        if scheduler_state is not None and 'lr' not in adjusted:  # else the new --lr's schedule, from here on
            lr_scheduler.load_state_dict(scheduler_state)
        progress.update(saved)
        if adjusted:
            progress['resumes'] = progress.get('resumes', []) + [
                {'checkpoint': resume_from.name, 'num_updates': progress['num_updates'], 'changed': adjusted}]
            log(f'resuming with changed options: {adjusted}')
        log(f'resuming from {resume_from} (epoch {progress["epoch"] + 1}, batch {progress["batches_done"]}, '
            f'{progress["num_updates"]} updates done)')
    elif args.resume == 'auto':
        log(f'--resume auto: no checkpoint in {output_dir / "checkpoints"}, starting from scratch')
    num_updates = progress['num_updates']
    lr_scheduler.step_update(num_updates=num_updates)

    if accelerator.is_main_process:
        log(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, '
            f'{num_classes} classes, input {tuple(data_config["input_size"])}; data {source}: '
            f'{_num_samples(train_ds) or "?"} train / {_num_samples(val_ds) or "?"} val; '
            f'{accelerator.num_processes} process(es) on {accelerator.device}, '
            f'mixed precision {accelerator.mixed_precision}; output {output_dir}')
    if accelerator.is_main_process:  # only now: a failed input check above leaves no empty folder behind
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.init_trackers('timm_ic', config=tracker_config(args))

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    eval_model = model_ema if model_ema is not None else model
    checkpoint_dir = output_dir / 'checkpoints'
    placement = getattr(unwrapped, 'placement', None)
    record: Dict[str, Any] = {
        'schema': RUN_RECORD_SCHEMA,
        'status': 'running',
        'model': args.model,
        'placement': str(placement) if placement is not None else None,
        'model_args': model_args,
        'num_classes': num_classes,
        'in_chans': in_chans,
        'label_names': label_names,
        'pretrained_cfg': dict(getattr(unwrapped, 'pretrained_cfg', {}) or {}),
        'data_config': data_config,
        'dataset': {'key': dataset_key(args.dataset, args.data_dir),
                    'name': args.dataset or ('folder' if args.data_dir else 'digits'), 'data_dir': args.data_dir,
                    'hub_id': args.dataset[5:] if args.dataset.startswith('hfds/') and not os.path.exists(
                        args.dataset[5:]) else None,
                    'train_split': args.train_split, 'val_split': args.val_split,
                    'train_samples': _num_samples(train_ds), 'val_samples': _num_samples(val_ds)},
        'recipe': None if args.recipe is None else {'name': args.recipe, 'path': recipe_path(args.recipe),
                                                     'values': args.recipe_values},
        'args': {k: v for k, v in vars(args).items() if k != 'recipe_values'},
        'versions': library_versions(),
        'distributed': {'world_size': accelerator.num_processes,
                        'distributed_type': accelerator.distributed_type.value,
                        'mixed_precision': accelerator.mixed_precision, 'device': str(accelerator.device)},
        'weights': {'best': 'best.safetensors', 'last': 'last.safetensors', 'ema': model_ema is not None},
    }

    def write_record(status: str) -> None:
        if not accelerator.is_main_process:
            return
        record.update(status=status, epochs=progress['history'], metrics=progress['best'],
                      started_at=progress['started_at'], resumes=progress['resumes'],
                      skipped_images=getattr(train_ds, 'skipped', 0) + getattr(val_ds, 'skipped', 0),
                      updated_at=datetime.now(timezone.utc).isoformat(timespec='seconds'))
        record['distributed']['train_samples_per_rank'] = progress['samples_per_rank']
        write_json_atomic(output_dir / 'run.json', record)

    def checkpoint(epoch: int, batches_done: int, totals: Optional[Tuple[torch.Tensor, int]] = None) -> Path:
        sync_ema_buffers(accelerator, model_ema)  # what is saved is what every process continues from
        state = {k: progress[k] for k in ('history', 'best', 'samples_per_rank', 'started_at', 'resumes')}
        state.update(epoch=epoch, batches_done=batches_done, num_updates=num_updates, options=resume_options(args),
                     scheduler=to_jsonable(lr_scheduler.state_dict()))
        if totals is not None:  # mid-epoch: each process's loss sum and samples so far, so the epoch's are exact
            loss_sum, samples = totals
            sent = torch.stack([loss_sum.float(), torch.tensor(float(samples), device=loss_sum.device)])
            state['epoch_totals'] = accelerator.gather(sent[None]).tolist()
        tensors = {'ema': model_ema.state_dict()} if model_ema is not None else None
        return save_checkpoint(accelerator, checkpoint_dir, num_updates, state, keep=args.checkpoint_limit,
                               tensors=tensors)

    state_modules = {'': unwrapped, **({'ema.': model_ema.module} if model_ema is not None else {})}
    try:
        for epoch in range(progress['epoch'], args.epochs):
            train_loader.set_epoch(epoch)
            if not iterable:
                train_ds.set_epoch(epoch)
            start_batch = progress['batches_done'] if epoch == progress['epoch'] else 0
            start_totals = (0.0, 0)
            if start_batch and progress.get('epoch_totals'):
                loss_sum, samples = progress['epoch_totals'][accelerator.process_index]
                start_totals = (loss_sum, int(samples))
            loader = accelerator.skip_first_batches(train_loader, start_batch) if start_batch else train_loader

            def on_update(updates: int, batches_done: int, nonfinite: torch.Tensor,
                          totals: Tuple[torch.Tensor, int], epoch: int = epoch) -> None:
                nonlocal num_updates
                num_updates = updates
                if args.checkpoint_every and updates % args.checkpoint_every == 0 and batches_done < num_batches:
                    check_finite(accelerator, nonfinite, epoch, updates)  # never save a broken model
                    check_finite_state(accelerator, state_modules, epoch, updates)
                    checkpoint(epoch, batches_done, totals)

            train_metrics, num_updates = train_one_epoch(
                epoch, model, loader, optimizer, train_loss_fn, accelerator, lr_scheduler, num_updates,
                num_batches, start_batch=start_batch, start_totals=start_totals, mixup_fn=mixup_fn,
                model_ema=model_ema, clip_grad=args.clip_grad, channels_last=args.channels_last,
                log_interval=args.log_interval, on_update=on_update, desc=f'epoch {epoch + 1}/{args.epochs}')
            check_finite_state(accelerator, state_modules, epoch, num_updates)  # before any evaluation or save
            lr_scheduler.step(epoch + 1)
            sync_ema_buffers(accelerator, model_ema)  # one model evaluated, the one saved
            eval_metrics = evaluate(eval_model, val_loader, accelerator, num_classes)
            ranks = accelerator.gather(torch.tensor([train_metrics['samples']], device=accelerator.device)).tolist()
            progress['samples_per_rank'] = [a + b for a, b in zip(progress['samples_per_rank'], ranks)]
            lr = optimizer.param_groups[0]['lr']
            row = {'epoch': epoch + 1, 'train_loss': train_metrics['loss'], 'lr': lr,
                   'eval_loss': eval_metrics['loss'], 'eval_top1': eval_metrics['top1'],
                   'eval_top5': eval_metrics['top5'], 'eval_samples': eval_metrics['samples'],
                   'train_img_per_s': train_metrics['img_per_s'], 'epoch_time_s': train_metrics['time_s'],
                   'train_samples_per_rank': ranks}
            progress['history'].append(row)
            is_best = progress['best'] is None or row['eval_top1'] > progress['best']['top1']
            if is_best:
                progress['best'] = {'epoch': row['epoch'], 'top1': row['eval_top1'], 'top5': row['eval_top5'],
                                    'loss': row['eval_loss']}
            log(f'epoch {epoch + 1}/{args.epochs}  train_loss {row["train_loss"]:.4f}  '
                f'val_loss {row["eval_loss"]:.4f}  top1 {row["eval_top1"]:.2f}  top5 {row["eval_top5"]:.2f}  '
                f'lr {lr:.3g}  {row["train_img_per_s"]:.0f} img/s  {row["epoch_time_s"]:.1f}s'
                f'{"  *best" if is_best else ""}')
            accelerator.log({'train/loss': row['train_loss'], 'train/lr': lr, 'eval/loss': row['eval_loss'],
                             'eval/top1': row['eval_top1'], 'eval/top5': row['eval_top5']}, step=num_updates)

            weights = accelerator.get_state_dict(eval_model.module if model_ema is not None else model)
            consume_prefix_in_state_dict_if_present(weights, '_orig_mod.')  # --compile's wrapper, not the model's
            if accelerator.is_main_process:
                metadata = {'format': 'pt', 'model': args.model, 'epoch': str(epoch + 1)}
                save_weights(weights, output_dir / 'last.safetensors', metadata)
                if is_best:
                    save_weights(weights, output_dir / 'best.safetensors', metadata)
                write_summary_csv(output_dir / 'summary.csv', progress['history'])
            progress.update(epoch=epoch + 1, batches_done=0)
            checkpoint(epoch + 1, 0)
            write_record('running')
    except NonFiniteLossError as e:
        record['stop_reason'] = str(e)
        write_record(f'stopped: non-finite {e.what}')
        accelerator.end_training()
        raise NonFiniteLossError(f'{e}; {nonfinite_advice(args, checkpoint_dir)}', e.what) from None

    write_record('finished')
    accelerator.end_training()
    best = progress['best']
    if best is not None:
        log(f'done: best top1 {best["top1"]:.2f} (epoch {best["epoch"]}); weights, checkpoints and '
            f'run.json in {output_dir}')
    if args.push_to_hub and accelerator.is_main_process:
        from timm_ic.hub import ExportError, HubPushError, RunRecordError, push_run
        try:
            push_run(str(output_dir), args.push_to_hub)
        # the export can refuse too (non-finite weights, a hub_export folder that is not ours): the run stays
        except (HubPushError, ExportError, RunRecordError, FileExistsError) as e:
            raise PushError(f'training finished and {output_dir} is kept, but the push failed: {e}') from e
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        training_function(args)
    except (UsageError, DataError, RecipeError, BadImageError, CheckpointError) as e:
        message = str(e)
        if message.startswith('Caught '):  # re-raised from a data-loader worker, its traceback in the message
            message = message.rstrip().splitlines()[-1].split(': ', 1)[-1]
        print(f'train.py: error: {message}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 3
    except PushError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 4
    return 0


if __name__ == '__main__':
    sys.exit(main())
