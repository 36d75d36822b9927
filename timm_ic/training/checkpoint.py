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
"""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator

from .._atomic import publish_folder, save_safetensors_atomic

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
