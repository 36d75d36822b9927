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
    run.json                            the run record (see the end), rewritten atomically after every epoch
    logs/                               tracker output with --log-with (tensorboard, wandb, ...)

Exit codes: 0 done; 2 bad input (an option, the data, a recipe, the model, the output folder, a checkpoint),
with a message naming it and no traceback, checked before the output folder is made where possible; 3 the loss,
weights or BatchNorm statistics became non-finite (nothing non-finite is saved); 4 --push-to-hub failed after
training (the run is kept); 1 anything else (a bug: please report its traceback).

run.json is a `timm_ic.run_record.RunRecord`: its docstring lists the fields.
"""
import argparse
import importlib.util
import math
import os
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils.data import DataLoader, IterableDataset

import timm_ic  # noqa: F401  (registers the timm-ic models with timm)
from timm_ic.layers import set_dropout_redraw
from timm_ic.training.checkpoint import (
    CheckpointError, check_resume_options, load_checkpoint, load_train_state, nonfinite_advice,
    resolve_output_and_resume, resume_options, save_checkpoint, save_weights, write_summary_csv,
)
from timm_ic.training.data import (
    BadImageError, DataError, SeededAugmentation, build_datasets, check_num_classes, dataset_key, default_in_chans,
    num_samples, prepare_loader, resolve_transforms,
)
from timm_ic.training.errors import NonFiniteLossError, PushError, UsageError
from timm_ic.training.loop import (
    TrainState, check_finite, check_finite_state, epoch_row, evaluate, sync_ema_buffers, train_one_epoch,
)
from timm_ic.training.model import model_from_args
from timm_ic.training.options import check_options, parse_args, tracker_config
from timm_ic.training.recipes import RecipeError, recipe_path
from timm_ic._atomic import finite_json
from timm_ic._versions import library_versions
from timm_ic.run_record import RunRecord


def make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    return Accelerator(
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


def load_data(args: argparse.Namespace) -> Tuple[Any, Any, Optional[list], int, int]:
    """Training and validation sets (no transforms yet), label names, input channels and classes."""
    default_chans = default_in_chans(args.dataset, args.data_dir)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else default_chans)
    img_modes = {1: 'L', 3: 'RGB', 4: 'RGBA'}
    if in_chans not in img_modes:
        raise UsageError(f'--in-chans {in_chans}: images can be read with 1, 3 or 4 channels.')
    train_ds, val_ds, label_names = build_datasets(
        args.dataset, args.data_dir, args.train_split, args.val_split, input_img_mode=img_modes[in_chans],
        bad_images=args.bad_images, seed=args.seed, batch_size=args.batch_size,
        input_key=args.input_key, target_key=args.target_key, download=args.dataset_download)
    num_classes = check_num_classes(args.num_classes, label_names, args.dataset or args.data_dir or 'digits')
    return train_ds, val_ds, label_names, in_chans, num_classes


def adapt_model(args: argparse.Namespace, accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """--sync-bn, --channels-last and --redraw-dropout."""
    if args.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type == 'cpu':
            raise UsageError('--sync-bn needs GPU processes (PyTorch\'s SyncBatchNorm runs on GPU modules only); '
                             'drop it for CPU runs.')
        model = timm.layers.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.redraw_dropout:
        if accelerator.device.type == 'cuda' and importlib.util.find_spec('triton') is None:
            raise UsageError('--redraw-dropout needs Triton on CUDA (its kernel is a Triton one): pip install triton, '
                             'or drop the flag to keep torch\'s dropout.')
        set_dropout_redraw(model)
    return model


def make_loaders(args: argparse.Namespace, accelerator: Accelerator, train_ds, val_ds) -> Tuple[Any, DataLoader,
                                                                                                 DataLoader]:
    """The training set (wrapped for seeded augmentation unless iterable) and both loaders, not yet prepared."""
    iterable = isinstance(train_ds, IterableDataset)
    if not iterable:  # augmentation draws from per-sample seeds: exact mid-epoch resume, any worker count
        train_ds = SeededAugmentation(train_ds, args.seed)
    pin = accelerator.device.type == 'cuda'
    loader_generator = torch.Generator().manual_seed(args.seed)  # keeps loader seeding off the global RNG
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=not iterable, drop_last=True,
                              num_workers=args.workers, persistent_workers=args.workers > 0,
                              pin_memory=pin, generator=loader_generator)
    val_loader = DataLoader(val_ds, batch_size=2 * args.batch_size, shuffle=False, num_workers=args.workers,
                            persistent_workers=args.workers > 0, pin_memory=pin,
                            generator=torch.Generator().manual_seed(args.seed))
    return train_ds, train_loader, val_loader


def batches_per_epoch(args: argparse.Namespace, train_loader: DataLoader, num_processes: int) -> int:
    if len(train_loader) == 0:
        raise DataError(f'the training split has fewer samples than one batch per process '
                        f'({args.batch_size} x {num_processes}); lower --batch-size.')
    num_batches = len(train_loader)
    if args.limit_train_batches and args.limit_train_batches < num_batches:
        # whole accumulation windows only: Accelerate closes a partial window at the loader's end, which a
        # limited epoch never reaches (its gradients would leak into the next epoch)
        windows = max(args.limit_train_batches // args.grad_accum_steps, 1)
        num_batches = min(windows * args.grad_accum_steps, num_batches)
    return num_batches


def make_loss(args: argparse.Namespace, num_classes: int) -> Tuple[Optional[Mixup], nn.Module]:
    """Mixup / CutMix (or None) and the training loss that goes with it."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


def resume(args: argparse.Namespace, accelerator: Accelerator, checkpoint: Path, state: TrainState, lr_scheduler,
           model_ema: Optional[ModelEmaV3], log: Callable[[str], None]) -> None:
    """Restore the checkpoint's model, optimizer, RNG states, EMA, scheduler and `state`."""
    saved = load_train_state(checkpoint)
    if len(saved['samples_per_rank']) != accelerator.num_processes:
        raise UsageError(f'{checkpoint} was saved by {len(saved["samples_per_rank"])} process(es); resume it '
                         f'with as many (this run has {accelerator.num_processes}).')
    adjusted = check_resume_options(args, saved.pop('options', None), checkpoint)
    scheduler_state = saved.pop('scheduler', None)
    load_checkpoint(accelerator, checkpoint, {'ema': model_ema.load_state_dict} if model_ema is not None else {})
    if scheduler_state is not None and 'lr' not in adjusted:  # else the new --lr's schedule, from here on
        lr_scheduler.load_state_dict(scheduler_state)
    state.restore(saved)
    if adjusted:
        state.resumes = state.resumes + [
            {'checkpoint': checkpoint.name, 'num_updates': state.num_updates, 'changed': adjusted}]
        log(f'resuming with changed options: {adjusted}')
    log(f'resuming from {checkpoint} (epoch {state.epoch + 1}, batch {state.batches_done}, '
        f'{state.num_updates} updates done)')


def checkpoint(args: argparse.Namespace, accelerator: Accelerator, output_dir: Path, state: TrainState,
               lr_scheduler, model_ema: Optional[ModelEmaV3], epoch: int, batches_done: int,
               totals: Optional[Tuple[torch.Tensor, int]] = None) -> Path:
    """Save a checkpoint at `batches_done` batches into `epoch`; every process calls this."""
    sync_ema_buffers(accelerator, model_ema)  # what is saved is what every process continues from
    saved = state.to_json()
    saved.update(epoch=epoch, batches_done=batches_done, options=resume_options(args),
                 scheduler=finite_json(lr_scheduler.state_dict()))
    if totals is not None:  # mid-epoch: each process's loss sum and samples so far, so the epoch's are exact
        loss_sum, samples = totals
        sent = torch.stack([loss_sum.float(), torch.tensor(float(samples), device=loss_sum.device)])
        saved['epoch_totals'] = accelerator.gather(sent[None]).tolist()
    tensors = {'ema': model_ema.state_dict()} if model_ema is not None else None
    return save_checkpoint(accelerator, output_dir / 'checkpoints', state.num_updates, saved,
                           keep=args.checkpoint_limit, tensors=tensors)


def start_record(args: argparse.Namespace, accelerator: Accelerator, model: nn.Module, model_args: Dict[str, Any],
                 num_classes: int, in_chans: int, label_names, data_config: Dict[str, Any], train_ds, val_ds,
                 ema: bool) -> RunRecord:
    """The run record's fields known before the first epoch."""
    placement = getattr(model, 'placement', None)
    return RunRecord(
        model=args.model,
        placement=str(placement) if placement is not None else None,
        model_args=model_args,
        num_classes=num_classes,
        in_chans=in_chans,
        label_names=label_names,
        pretrained_cfg=dict(getattr(model, 'pretrained_cfg', {}) or {}),
        data_config=data_config,
        dataset={'key': dataset_key(args.dataset, args.data_dir),
                 'name': args.dataset or ('folder' if args.data_dir else 'digits'), 'data_dir': args.data_dir,
                 'hub_id': args.dataset[5:] if args.dataset.startswith('hfds/') and not os.path.exists(
                     args.dataset[5:]) else None,
                 'train_split': args.train_split, 'val_split': args.val_split,
                 'train_samples': num_samples(train_ds), 'val_samples': num_samples(val_ds)},
        recipe=None if args.recipe is None else {'name': args.recipe, 'path': recipe_path(args.recipe),
                                                  'values': args.recipe_values},
        args={k: v for k, v in vars(args).items() if k != 'recipe_values'},
        versions=library_versions(),
        distributed={'world_size': accelerator.num_processes,
                     'distributed_type': accelerator.distributed_type.value,
                     'mixed_precision': accelerator.mixed_precision, 'device': str(accelerator.device)},
        weights={'best': 'best.safetensors', 'last': 'last.safetensors', 'ema': ema},
    )


def write_record(accelerator: Accelerator, output_dir: Path, record: RunRecord, state: TrainState,
                 status: str, skipped_images: int) -> None:
    """Bring the record up to date with `state` and write run.json (main process)."""
    if not accelerator.is_main_process:
        return
    record.status, record.epochs, record.metrics = status, state.history, state.best
    record.started_at, record.resumes, record.skipped_images = state.started_at, state.resumes, skipped_images
    record.updated_at = datetime.now(timezone.utc).isoformat(timespec='seconds')
    record.distributed['train_samples_per_rank'] = state.samples_per_rank
    record.write(output_dir / 'run.json')


def save_epoch_weights(accelerator: Accelerator, output_dir: Path, model: nn.Module, model_ema, model_name: str,
                       state: TrainState, is_best: bool) -> None:
    """last.safetensors (and best.safetensors) of the evaluated model, and summary.csv."""
    weights = accelerator.get_state_dict(model_ema.module if model_ema is not None else model)
    consume_prefix_in_state_dict_if_present(weights, '_orig_mod.')  # --compile's wrapper, not the model's
    if accelerator.is_main_process:
        metadata = {'format': 'pt', 'model': model_name, 'epoch': str(state.epoch)}
        save_weights(weights, output_dir / 'last.safetensors', metadata)
        if is_best:
            save_weights(weights, output_dir / 'best.safetensors', metadata)
        write_summary_csv(output_dir / 'summary.csv', state.history)


def log_epoch(log: Callable[[str], None], accelerator: Accelerator, row: Dict[str, Any], epochs: int,
              is_best: bool, num_updates: int) -> None:
    log(f'epoch {row["epoch"]}/{epochs}  train_loss {row["train_loss"]:.4f}  '
        f'val_loss {row["eval_loss"]:.4f}  top1 {row["eval_top1"]:.2f}  top5 {row["eval_top5"]:.2f}  '
        f'lr {row["lr"]:.3g}  {row["train_img_per_s"]:.0f} img/s  {row["epoch_time_s"]:.1f}s'
        f'{"  *best" if is_best else ""}')
    accelerator.log({'train/loss': row['train_loss'], 'train/lr': row['lr'], 'eval/loss': row['eval_loss'],
                     'eval/top1': row['eval_top1'], 'eval/top5': row['eval_top5']}, step=num_updates)


def training_function(args: argparse.Namespace) -> RunRecord:
    """Train and evaluate as the options say; returns the run record (also written to run.json)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec='seconds')
    check_options(args)

    # the process group first (as the Accelerator would set it up), so that all processes agree on the
    # output folder, which the trackers need when the Accelerator is built
    PartialState(cpu=args.cpu or parse_flag_from_env('ACCELERATE_USE_CPU'))
    output_dir, resume_from, resume_notes = resolve_output_and_resume(args)
    accelerator = make_accelerator(args, output_dir)
    log = accelerator.on_main_process(print)  # once per job (accelerator.print is once per node)
    set_seed(args.seed, device_specific=True)  # per-process dropout draws; DDP copies rank 0's initial weights
    for note in resume_notes:
        log(f'--resume: {note}')

    # data and model
    train_ds, val_ds, label_names, in_chans, num_classes = load_data(args)
    model, model_args = model_from_args(args, num_classes, in_chans, log)
    recipe_placement = (args.recipe_values or {}).get('placement')
    if recipe_placement and args.placement is None:
        log(f'{args.model} keeps its own placement {model_args.get("placement")}; the recipe\'s '
            f'{recipe_placement!r} is for {args.recipe_values.get("model")} (pass --placement to choose one).')
    data_config, train_ds.transform, val_ds.transform = resolve_transforms(args, model, in_chans)
    model = adapt_model(args, accelerator, model)
    train_ds, train_loader, val_loader = make_loaders(args, accelerator, train_ds, val_ds)

    # optimizer, schedule, EMA and loss
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_loader, val_loader = (prepare_loader(accelerator, loader, args.workers)
                                for loader in (train_loader, val_loader))
    num_batches = batches_per_epoch(args, train_loader, accelerator.num_processes)
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=math.ceil(num_batches / args.grad_accum_steps))
    # the scheduler and the EMA are saved by us (JSON, safetensors), not registered with Accelerate, which
    # would pickle them and unpickle them on resume: loading a checkpoint someone sent runs no code
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    model_ema = ModelEmaV3(unwrapped, decay=args.ema_decay) if args.ema_decay > 0 else None
    mixup_fn, train_loss_fn = make_loss(args, num_classes)

    # where we start: a checkpoint's epoch and batch, or the beginning
    state = TrainState(samples_per_rank=[0] * accelerator.num_processes, started_at=started_at)
    if resume_from is not None:
        resume(args, accelerator, resume_from, state, lr_scheduler, model_ema, log)
    elif args.resume == 'auto':
        log(f'--resume auto: no checkpoint in {output_dir / "checkpoints"}, starting from scratch')
    lr_scheduler.step_update(num_updates=state.num_updates)

    log(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, '
        f'{num_classes} classes, input {tuple(data_config["input_size"])}; data '
        f'{args.dataset or args.data_dir or "digits"}: {num_samples(train_ds) or "?"} train / '
        f'{num_samples(val_ds) or "?"} val; {accelerator.num_processes} process(es) on {accelerator.device}, '
        f'mixed precision {accelerator.mixed_precision}; output {output_dir}')
    if accelerator.is_main_process:  # only now: a failed input check above leaves no empty folder behind
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.init_trackers('timm_ic', config=tracker_config(args))
    record = start_record(args, accelerator, unwrapped, model_args, num_classes, in_chans, label_names, data_config,
                          train_ds, val_ds, ema=model_ema is not None)

    def write(status: str) -> None:
        skipped = getattr(train_ds, 'skipped', 0) + getattr(val_ds, 'skipped', 0)
        write_record(accelerator, output_dir, record, state, status, skipped)

    save = partial(checkpoint, args, accelerator, output_dir, state, lr_scheduler, model_ema)
    state_modules = {'': unwrapped, **({'ema.': model_ema.module} if model_ema is not None else {})}
    try:
        for epoch in range(state.epoch, args.epochs):
            train_loader.set_epoch(epoch)
            if isinstance(train_ds, SeededAugmentation):
                train_ds.set_epoch(epoch)
            start_batch, start_totals = state.start_of(epoch, accelerator.process_index)
            loader = accelerator.skip_first_batches(train_loader, start_batch) if start_batch else train_loader

            def on_update(batches_done: int, nonfinite: torch.Tensor, totals: Tuple[torch.Tensor, int],
                          epoch: int = epoch) -> None:
                if args.checkpoint_every and state.num_updates % args.checkpoint_every == 0 and \
                        batches_done < num_batches:
                    check_finite(accelerator, nonfinite, epoch, state.num_updates)  # never save a broken model
                    check_finite_state(accelerator, state_modules, epoch, state.num_updates)
                    save(epoch, batches_done, totals)

            train_metrics = train_one_epoch(
                epoch, model, loader, optimizer, train_loss_fn, accelerator, lr_scheduler, state, num_batches,
                start_batch=start_batch, start_totals=start_totals, mixup_fn=mixup_fn, model_ema=model_ema,
                clip_grad=args.clip_grad, channels_last=args.channels_last, log_interval=args.log_interval,
                on_update=on_update, desc=f'epoch {epoch + 1}/{args.epochs}')
            check_finite_state(accelerator, state_modules, epoch, state.num_updates)  # before evaluation or save
            lr_scheduler.step(epoch + 1)
            sync_ema_buffers(accelerator, model_ema)  # one model evaluated, the one saved
            eval_metrics = evaluate(model_ema if model_ema is not None else model, val_loader, accelerator,
                                    num_classes)
            ranks = accelerator.gather(torch.tensor([train_metrics['samples']], device=accelerator.device)).tolist()
            row = epoch_row(epoch, train_metrics, eval_metrics, optimizer.param_groups[0]['lr'], ranks)
            is_best = state.end_epoch(row, ranks)
            log_epoch(log, accelerator, row, args.epochs, is_best, state.num_updates)
            save_epoch_weights(accelerator, output_dir, model, model_ema, args.model, state, is_best)
            save(epoch + 1, 0)
            write('running')
    except NonFiniteLossError as e:
        record.stop_reason = str(e)
        write(f'stopped: non-finite {e.what}')
        accelerator.end_training()
        raise NonFiniteLossError(f'{e}; {nonfinite_advice(args, output_dir / "checkpoints")}', e.what) from None

    write('finished')
    accelerator.end_training()
    if state.best is not None:
        log(f'done: best top1 {state.best["top1"]:.2f} (epoch {state.best["epoch"]}); weights, checkpoints and '
            f'run.json in {output_dir}')
    if args.push_to_hub and accelerator.is_main_process:
        push(output_dir, args.push_to_hub)
    return record


def push(output_dir: Path, repo_id: str) -> None:
    """--push-to-hub: export the run and push it; a failure keeps the run and says why."""
    from timm_ic.hub import ExportError, HubPushError, RunRecordError, push_run
    try:
        push_run(str(output_dir), repo_id)
    # the export can refuse too (non-finite weights, a hub_export folder that is not ours): the run stays
    except (HubPushError, ExportError, RunRecordError, FileExistsError) as e:
        raise PushError(f'training finished and {output_dir} is kept, but the push failed: {e}') from e


def main(argv: Optional[Sequence[str]] = None) -> int:
    """train.py's command line: the exit code (see above), a message instead of a traceback for bad input."""
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
