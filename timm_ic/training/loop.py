"""The training loop of `train.py`: one epoch of updates, evaluation, and the checks that stop a diverging run.

`TrainState` is what the loop carries from update to update and epoch to epoch; it is what a checkpoint's
`train_state.json` holds besides the options and the scheduler, so a resumed run continues from it exactly.
The loop never waits on the device for its progress bar or its non-finite check (`LaggedReadout`).
"""
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast
from timm.data import Mixup
from timm.utils import ModelEmaV3, accuracy
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .errors import NonFiniteLossError


@dataclass
class TrainState:
    """Where a run is and what it has measured, as saved in each checkpoint's train_state.json."""
    samples_per_rank: List[int]  # training samples each process has seen, over all epochs
    started_at: str  # UTC ISO time of the run's first start, kept across resumes
    epoch: int = 0  # epochs done
    batches_done: int = 0  # batches of epoch `epoch` done (a mid-epoch checkpoint)
    num_updates: int = 0  # optimizer updates done
    history: List[Dict[str, Any]] = field(default_factory=list)  # one row per epoch (`epoch_row`)
    best: Optional[Dict[str, Any]] = None  # {epoch, top1, top5, loss} of the best top-1 epoch
    resumes: List[Dict[str, Any]] = field(default_factory=list)  # resumes that changed --lr / --clip-grad
    epoch_totals: Optional[List[List[float]]] = None  # per process [loss sum, samples] at a mid-epoch checkpoint

    _SAVED = ('history', 'best', 'samples_per_rank', 'started_at', 'resumes', 'epoch', 'batches_done', 'num_updates')

    def to_json(self) -> Dict[str, Any]:
        """The fields a checkpoint saves (epoch_totals are gathered at save time, see train.py's checkpoint)."""
        return {k: getattr(self, k) for k in self._SAVED}

    def restore(self, saved: Dict[str, Any]) -> None:
        """Take over the fields of a checkpoint's train_state.json (others, e.g. options, are the caller's)."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])

    def start_of(self, epoch: int, process_index: int) -> Tuple[int, Tuple[float, int]]:
        """Batches of `epoch` already done, and this process's (loss sum, samples) over them."""
        start_batch = self.batches_done if epoch == self.epoch else 0
        if start_batch and self.epoch_totals:
            loss_sum, samples = self.epoch_totals[process_index]
            return start_batch, (loss_sum, int(samples))
        return start_batch, (0.0, 0)

    def end_epoch(self, row: Dict[str, Any], ranks: List[int]) -> bool:
        """Record an epoch's row (see `epoch_row`) and samples per process; True if it is the best so far."""
        self.samples_per_rank = [a + b for a, b in zip(self.samples_per_rank, ranks)]
        self.history.append(row)
        is_best = self.best is None or row['eval_top1'] > self.best['top1']
        if is_best:
            self.best = {'epoch': row['epoch'], 'top1': row['eval_top1'], 'top5': row['eval_top5'],
                         'loss': row['eval_loss']}
        self.epoch, self.batches_done = row['epoch'], 0
        return is_best


def epoch_row(epoch: int, train_metrics: Dict[str, float], eval_metrics: Dict[str, float], lr: float,
              ranks: List[int]) -> Dict[str, Any]:
    """run.json's and summary.csv's row of an epoch (`epoch` 0-based here, 1-based in the row)."""
    return {'epoch': epoch + 1, 'train_loss': train_metrics['loss'], 'lr': lr,
            'eval_loss': eval_metrics['loss'], 'eval_top1': eval_metrics['top1'],
            'eval_top5': eval_metrics['top5'], 'eval_samples': eval_metrics['samples'],
            'train_img_per_s': train_metrics['img_per_s'], 'epoch_time_s': train_metrics['time_s'],
            'train_samples_per_rank': ranks}


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        accelerator: Accelerator,
        lr_scheduler,
        state: TrainState,
        num_batches: int,
        start_batch: int = 0,
        start_totals: Tuple[float, int] = (0.0, 0),
        mixup_fn: Optional[Mixup] = None,
        model_ema: Optional[ModelEmaV3] = None,
        clip_grad: Optional[float] = None,
        channels_last: bool = False,
        log_interval: int = 20,
        on_update: Optional[Callable[[int, torch.Tensor, Tuple[torch.Tensor, int]], None]] = None,
        desc: str = '',
) -> Dict[str, float]:
    """One pass over `loader` (at most `num_batches` batches, the first `start_batch` already done, with
    `start_totals` = (loss sum, samples) of those).

    Returns the epoch's metrics; counts each optimizer update in `state.num_updates`. `on_update(batches_done,
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
            state.num_updates += 1
            lr_scheduler.step_update(num_updates=state.num_updates)
            if model_ema is not None:
                model_ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=state.num_updates)
            if on_update is not None:
                on_update(batches_done, nonfinite, (loss_sum, samples))
        bar.update(1)
        if batches_done % log_interval == 0 and batches_done < num_batches:  # the epoch's end checks below
            seen = readout.pop()  # the previous interval's loss and non-finite count, long since computed
            if seen is not None and seen[1] > 0:
                raise NonFiniteLossError(nonfinite_message(epoch, state.num_updates))
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
    check_finite(accelerator, nonfinite, epoch, state.num_updates)
    metrics = {
        'loss': accelerator.reduce(loss_sum / max(batches_done, 1), reduction='mean').item(),
        'img_per_s': (samples - start_samples) * accelerator.num_processes / max(elapsed, 1e-9),
        'samples': samples,
        'time_s': elapsed,
    }
    return metrics



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

