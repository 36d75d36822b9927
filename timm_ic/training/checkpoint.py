"""Atomic, pruned training checkpoints around `Accelerator.save_state` / `load_state`.

A checkpoint is the folder `<output>/checkpoints/checkpoint-<updates:09d>/`: Accelerate's state (model,
optimizer, registered scheduler and EMA, RNG states of every process, the data sampler) plus `train_state.json`
(epoch, batches done in that epoch, optimizer updates, metric history). It is written into a hidden
temporary folder and renamed into place, so a crash mid-save leaves the previous checkpoints intact.
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator

from .._atomic import publish_folder, save_safetensors_atomic

CHECKPOINT_PREFIX = 'checkpoint-'
TRAIN_STATE_FILE = 'train_state.json'
_CHECKPOINT_RE = re.compile(rf'^{CHECKPOINT_PREFIX}(\d+)$')


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


def prune_checkpoints(checkpoint_dir: os.PathLike, keep: int) -> List[Path]:
    """Delete all but the newest `keep` checkpoints (and crash leftovers of unfinished saves)."""
    checkpoint_dir = Path(checkpoint_dir)
    removed = []
    for leftover in checkpoint_dir.glob(f'.tmp-{CHECKPOINT_PREFIX}*'):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    checkpoints = list_checkpoints(checkpoint_dir)
    for path in checkpoints[:max(len(checkpoints) - max(keep, 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_checkpoint(
        accelerator: Accelerator,
        checkpoint_dir: os.PathLike,
        num_updates: int,
        train_state: Dict[str, Any],
        keep: int = 3,
) -> Path:
    """Save Accelerate's state plus `train_state` atomically; every process must call this.

    All processes write into the same temporary folder (each its own RNG state file); the main process then
    adds `train_state.json`, renames the folder into place and prunes old checkpoints.
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
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=1))
        publish_folder(tmp, final)  # the same update count saved again (e.g. after a resume) is replaced
        prune_checkpoints(checkpoint_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_train_state(checkpoint: os.PathLike) -> Dict[str, Any]:
    """The `train_state.json` of a checkpoint folder."""
    return json.loads((Path(checkpoint) / TRAIN_STATE_FILE).read_text())


def save_weights(state_dict: Dict[str, torch.Tensor], path: os.PathLike,
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors atomically."""
    save_safetensors_atomic(state_dict, path, metadata)
