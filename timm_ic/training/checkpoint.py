"""Atomic, pruned training checkpoints around `Accelerator.save_state` / `load_state`.

A checkpoint is the folder `<output>/checkpoints/checkpoint-<updates:09d>/`: Accelerate's state (model as
safetensors, optimizer, RNG states of every process), further tensors of ours as `<name>.safetensors` (the EMA),
`train_state.json` (epoch, batches done in that epoch, optimizer updates, metric history, the scheduler's
state) and `checksums.json` (SHA-256 of every other file). It is written into a hidden temporary folder and
renamed into place, so a crash mid-save leaves the previous checkpoints intact.

A checkpoint folder is something people share, so loading it runs no code: nothing is registered with
Accelerate's pickled `custom_checkpoint_*.pkl`, and the files Accelerate does load (optimizer, RNG states) are
read with `torch.load(weights_only=True)`, which this module checks itself for the RNG states because
Accelerate ignores a failure there. `verify_checkpoint` finds a damaged or incomplete one before it is loaded.

train.py's policy lives here too: which output folder a run writes to, which checkpoint `--resume` continues
from (`resolve_output_and_resume`), which options a resume may change (`check_resume_options`), and what to
do after a divergence (`nonfinite_advice`).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from timm.utils import update_summary

from .._atomic import publish_folder, save_safetensors_atomic
from .errors import UsageError
from .._atomic import finite_json

CHECKPOINT_PREFIX = 'checkpoint-'
TRAIN_STATE_FILE = 'train_state.json'
CHECKSUMS_FILE = 'checksums.json'
RNG_STATE_FILE = 'random_states_{}.pkl'  # Accelerate's name, one per process
_CHECKPOINT_RE = re.compile(rf'^{CHECKPOINT_PREFIX}(\d+)$')


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the reason."""


def list_checkpoints(checkpoint_dir: os.PathLike) -> List[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first (by optimizer-update count)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / TRAIN_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(checkpoint_dir: os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(checkpoint_dir: os.PathLike, keep: int, protect: Optional[os.PathLike] = None) -> List[Path]:
    """Delete all but the newest `keep` checkpoints (and crash leftovers of unfinished saves), never `protect`
    (the one just saved: after a resume from an older checkpoint, newer ones of the abandoned run may remain)."""
    checkpoint_dir = Path(checkpoint_dir)
    removed = []
    for leftover in checkpoint_dir.glob(f'.tmp-{CHECKPOINT_PREFIX}*'):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    checkpoints = list_checkpoints(checkpoint_dir)
    for path in checkpoints[:max(len(checkpoints) - max(keep, 1), 0)]:
        if protect is not None and path == Path(protect):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _sha256(path: Path) -> str:
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def save_checkpoint(
        accelerator: Accelerator,
        checkpoint_dir: os.PathLike,
        num_updates: int,
        train_state: Dict[str, Any],
        keep: int = 3,
        tensors: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
) -> Path:
    """Save Accelerate's state, `tensors` (name -> state dict, as `<name>.safetensors`) and `train_state`
    atomically; every process must call this.

    All processes write into the same temporary folder (each its own RNG state file); the main process then
    adds the rest and the checksums, renames the folder into place and prunes old checkpoints.
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f'{CHECKPOINT_PREFIX}{num_updates:09d}'
    tmp = checkpoint_dir / f'.tmp-{final.name}'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, state_dict in (tensors or {}).items():
            save_safetensors_atomic(state_dict, tmp / f'{name}.safetensors')
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=1))
        checksums = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=1))
        publish_folder(tmp, final)  # the same update count saved again (e.g. after a resume) is replaced
        prune_checkpoints(checkpoint_dir, keep, protect=final)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(checkpoint: os.PathLike, num_processes: Optional[int] = None) -> Optional[str]:
    """None if `checkpoint` is whole, else what is wrong, naming the file: every file against the checksums
    written at save time, `train_state.json` readable, one RNG state file per process."""
    checkpoint = Path(checkpoint)
    manifest = checkpoint / CHECKSUMS_FILE
    try:
        checksums = json.loads(manifest.read_text())
        if not isinstance(checksums, dict):
            raise ValueError('not a mapping')
    except FileNotFoundError:
        return (f'{manifest} is missing (a checkpoint of an older train.py, whose scheduler and EMA are pickles, '
                f'which are not loaded)')
    except (OSError, ValueError) as e:
        return f'{manifest} is unreadable ({e})'
    for name, digest in checksums.items():
        path = checkpoint / name
        if not path.is_file():
            return f'{path} is missing'
        if _sha256(path) != digest:
            return f'{path} is damaged (its checksum differs from the one written when it was saved)'
    try:
        state = load_train_state(checkpoint)
    except (OSError, ValueError) as e:
        return f'{checkpoint / TRAIN_STATE_FILE} is unreadable ({e})'
    if num_processes is None:
        num_processes = len(state.get('samples_per_rank') or [None])
    for rank in range(num_processes):
        if RNG_STATE_FILE.format(rank) not in checksums:
            return f'{checkpoint / RNG_STATE_FILE.format(rank)} is missing'
    return None


def find_resumable_checkpoint(checkpoint_dir: os.PathLike) -> Tuple[Optional[Path], List[str]]:
    """The newest checkpoint that verifies, and what is wrong with each newer one (skipped)."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(checkpoint_dir)):
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(problem)
    return None, skipped


def load_checkpoint(
        accelerator: Accelerator,
        checkpoint: os.PathLike,
        load_tensors: Optional[Dict[str, Callable[[Dict[str, torch.Tensor]], Any]]] = None,
) -> None:
    """`Accelerator.load_state` and each `<name>.safetensors` passed to `load_tensors[name]`; every process
    calls this. Raises `CheckpointError` naming the file that fails."""
    from accelerate.utils import load as accelerate_load
    from safetensors.torch import load_file
    checkpoint = Path(checkpoint)
    # Accelerate logs a failure to load the RNG states at INFO level and goes on: the resumed run would no
    # longer be the same run. Read them here first (weights_only, as Accelerate does) to fail instead.
    rng_file = checkpoint / RNG_STATE_FILE.format(accelerator.process_index)
    try:
        accelerate_load(rng_file, weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{rng_file} cannot be read ({type(e).__name__}: {e})') from e
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:
        raise CheckpointError(f'{checkpoint} cannot be loaded ({type(e).__name__}: {e})') from e
    for name, load in (load_tensors or {}).items():
        path = checkpoint / f'{name}.safetensors'
        try:
            load(load_file(path))
        except Exception as e:
            raise CheckpointError(f'{path} cannot be loaded ({type(e).__name__}: {e})') from e


def load_train_state(checkpoint: os.PathLike) -> Dict[str, Any]:
    """The `train_state.json` of a checkpoint folder."""
    state = json.loads((Path(checkpoint) / TRAIN_STATE_FILE).read_text())
    if not isinstance(state, dict):
        raise ValueError('not a mapping')
    return state


def save_weights(state_dict: Dict[str, torch.Tensor], path: os.PathLike,
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors atomically."""
    save_safetensors_atomic(state_dict, path, metadata)


# --- the resume and output-folder policy of train.py ---

# options a resumed run may change; any other difference from the checkpoint's options is refused
RESUME_MAY_CHANGE = ('output', 'resume', 'recipe', 'recipe_values', 'log_with', 'log_interval', 'workers',
                     'checkpoint_every', 'checkpoint_limit', 'push_to_hub', 'bad_images', 'cpu', 'overwrite',
                     'dataset_download')



# options a resumed run may adjust, e.g. after a divergence; run.json's `resumes` records each change
RESUME_MAY_ADJUST = ('lr', 'clip_grad')



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



def resume_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options a checkpoint must be resumed with, as they read back from JSON."""
    options = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
    return json.loads(json.dumps(finite_json(options)))



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

