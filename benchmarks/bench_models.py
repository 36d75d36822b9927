"""Speed of each placement against its same-skeleton baseline, measured in one run.

For every (model, baseline) pair: inference images/s (eval, no grad) and training images/s
(forward + backward + SGD step); a baseline and all its models run on the same input, interleaved
repeats, median of the repeats; prints each model's ratio to its baseline (1.00 = as fast): the median of the
per-repeat ratios (each repeat times a model and its baseline back to back) [their interquartile range]. Then inference
with BatchNorm folded into the weight layers on both sides (`fold`: timm-ic models by `PlacedNet.fuse()`, which
runs `timm.utils.reparameterize_model`; timm's own baselines, which have no `fuse`, by torch's standard conv-BN
fold `torch.fx.experimental.optimization.fuse`) and its ratio. Then the peak
memory of two training steps: on CPU each model in a fresh child process, the rise of its peak RSS (Linux VmHWM,
reset once model, optimizer and input exist) over its RSS then (without /proc the whole peak); on CUDA, in this
process, `torch.cuda.max_memory_allocated` over the memory allocated before the steps. On CUDA cuDNN picks
each conv's algorithm during the warm-up (`cudnn.benchmark`, as timm's train.py). A pair that fails (out of
memory, say) prints its error and the run goes on. Also times
`timm_ic.rewrite` of resnet152 (real weights, then meta device).

The pairs are `timm_ic.models.BASELINES` (every paper-placement model and its baseline); `--only` keeps some.

    python benchmarks/bench_models.py                       # CPU, every pair; ImageNet ones at 112px
    python benchmarks/bench_models.py --only ic_resnet20 ic_resnet18
    python benchmarks/bench_models.py --device cuda --amp --batch-size 128 --image-size 224

On CPU much of a step can be the allocator: glibc's malloc hands freed activation memory back to the OS, and
every fresh page of the next step faults, which costs about as much as a pass over it; a model that allocates
more (a dropout's output and mask) pays more of it. PyTorch's performance tuning guide suggests a caching
allocator on CPU (jemalloc, tcmalloc); glibc's own knobs keep freed memory in the process without installing one:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python benchmarks/bench_models.py ...
"""
import argparse
import copy
import multiprocessing
import statistics
import time
from typing import List, Optional

import timm
import torch

try:
    import resource  # Unix only: peak RSS of a process
except ImportError:
    resource = None

import timm_ic
from timm_ic.layers import set_dropout_redraw
from timm_ic.models import BASELINES, PlacedNet

PAIRS = sorted(BASELINES.items())


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_step(fn, device, steps: int) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def build(name: str, x: torch.Tensor, amp: bool, compile: bool = False, redraw: bool = False):
    """The model in train mode and its inference and training-step closures, not yet run; with `compile`, the
    training step runs the model through `torch.compile` (inductor), the same parameters; with `redraw`, its
    dropouts redraw in backward (`timm_ic.layers.set_dropout_redraw`)."""
    device = x.device
    model = timm.create_model(name, num_classes=10).to(device)
    set_dropout_redraw(model, redraw)
    forward = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = torch.randint(0, 10, (x.shape[0],), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def infer():
        with torch.no_grad(), autocast:
            model(x)

    def train():
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, infer, train


def measure(name: str, x: torch.Tensor, amp: bool, redraw: bool = False):
    model, infer, train = build(name, x, amp, redraw=redraw)
    model.eval()
    infer()  # warm-up
    model.train()
    train()
    return model, infer, train


def compiled_train(name: str, x: torch.Tensor, amp: bool):
    """A compiled training step of a fresh `name` (compiled and warmed up here), or None where torch.compile
    fails on it (the message is printed)."""
    model, _, train = build(name, x, amp, compile=True)
    model.train()
    try:
        train()
        train()  # a second step: recompiles, if any, happen before timing
    except Exception as e:  # inductor needs a C++ compiler on CPU; report, do not abort the benchmark
        print(f'torch.compile failed on {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}')
        return None
    return train


def folded_infer(model: torch.nn.Module, x: torch.Tensor, amp: bool):
    """Inference of a copy of `model` with its BatchNorms folded (module doc)."""
    model = copy.deepcopy(model).eval()
    if isinstance(model, PlacedNet):
        model = model.fuse()
    else:
        from torch.fx.experimental.optimization import fuse
        model = fuse(model)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)

    def infer():
        with torch.no_grad(), autocast:
            model(x)

    infer()  # warm-up (and the bias maps' cache)
    return infer


def proc_status_bytes(field: str) -> Optional[int]:
    """A memory field of /proc/self/status (Linux: VmRSS now, VmHWM peak), or None where there is none."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def peak_train_memory(name: str, batch_size: int, size: int, amp: bool, device: str, redraw: bool = False) -> float:
    """MiB that two training steps of `name` add at their peak, over what model, optimizer and input hold."""
    device = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, device=device)
    model, infer, train = build(name, x, amp, redraw=redraw)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train(), train()  # the second step holds the optimizer state the first one created
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    # not getrusage's ru_maxrss: Linux carries the parent's RSS at fork into it, across exec. VmHWM is this
    # process's own peak, and writing 5 to clear_refs resets it to the RSS now
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass
    before = proc_status_bytes('VmRSS')
    train(), train()
    peak = proc_status_bytes('VmHWM')
    if before is None or peak is None:  # no /proc (macOS): the whole peak, in bytes there
        before, peak = 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) / 2 ** 20


def peak_train_memory_in_child(*args) -> float:
    # spawn, not fork: a forked child would inherit the parent's peak RSS and CUDA context
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(peak_train_memory, args)


def peak_train_memory_of(name: str, batch_size: int, size: int, amp: bool, device: str,
                         redraw: bool = False) -> float:
    """`peak_train_memory`: on CUDA in this process (the allocator counts only what the steps add; a child would
    spend seconds starting CUDA), on CPU in a fresh child (a process's peak RSS cannot be reset to below what
    earlier models left)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()
        return peak_train_memory(name, batch_size, size, amp, device, redraw)
    return peak_train_memory_in_child(name, batch_size, size, amp, device, redraw)


def ratio_cell(model_seconds: List[float], baseline_seconds: List[float]) -> str:
    """The model's speed over its baseline's: the median of the per-repeat ratios [their interquartile range]."""
    r = [b / m for b, m in zip(baseline_seconds, model_seconds)]
    q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0],) * 3
    return f'{statistics.median(r):5.2f} [{q1:.2f}-{q3:.2f}]'


def bench_group(baseline: str, names: List[str], args: argparse.Namespace, memory: bool, cell: int) -> None:
    """Times `baseline` and its `names` interleaved, and prints a row per name."""
    device = torch.device(args.device)
    size = 32 if timm.get_pretrained_cfg(baseline).input_size[-1] == 32 else args.image_size
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    runs = {n: measure(n, x, args.amp, args.redraw_dropout) for n in (baseline, *names)}
    folded = {n: folded_infer(model, x, args.amp) for n, (model, _, _) in runs.items()}
    compiled = {n: compiled_train(n, x, args.amp) for n in runs} if args.compile else {}
    times = {n: {'infer': [], 'train': [], 'fold': [], 'compiled': []} for n in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        for n, (model, infer, train) in runs.items():
            model.eval()
            times[n]['infer'].append(time_step(infer, device, args.steps))
            model.train()
            times[n]['train'].append(time_step(train, device, args.steps))
            times[n]['fold'].append(time_step(folded[n], device, args.steps))
            if compiled.get(n) is not None:
                times[n]['compiled'].append(time_step(compiled[n], device, args.steps))
    rate = {n: {k: args.batch_size / statistics.median(v) for k, v in t.items() if v} for n, t in times.items()}
    del runs, folded, compiled
    if memory:
        mib = {n: peak_train_memory_of(n, args.batch_size, size, args.amp, str(device), args.redraw_dropout)
               for n in (baseline, *names)}
    for name in names:
        t, tb = times[name], times[baseline]
        compiled_cells = ''
        if args.compile:
            compiled_cells = (f' {rate[name]["compiled"]:14.1f} {ratio_cell(t["compiled"], tb["compiled"])}'
                              if t['compiled'] and tb['compiled'] else f' {"n/a":>14s} {"":>{cell}s}')
        print(f'{name:24s} {baseline:22s} {rate[name]["infer"]:12.1f} {ratio_cell(t["infer"], tb["infer"])}'
              f' {rate[name]["train"]:12.1f} {ratio_cell(t["train"], tb["train"])}'
              + (f' {mib[name]:10.1f} {mib[name] / mib[baseline]:6.2f}' if memory else '')
              + f' {rate[name]["fold"]:11.1f} {ratio_cell(t["fold"], tb["fold"])}' + compiled_cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--image-size', type=int, default=112, help='input size for the ImageNet models')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    parser.add_argument('--only', nargs='*', help='model names to keep')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak training memory columns')
    parser.add_argument('--redraw-dropout', action='store_true',
                        help="CUDA: the models' dropouts keep a seed and draw again in backward "
                             '(set_dropout_redraw: less memory)')
    parser.add_argument('--compile', action='store_true',
                        help='also time training through torch.compile (inductor; minutes of compiling per model)')
    args = parser.parse_args()
    unknown = sorted(set(args.only or ()) - set(BASELINES))
    if unknown:  # a typo would otherwise benchmark nothing, silently
        parser.error(f'--only: {unknown} have no baseline pair; valid: {sorted(BASELINES)}')
    for flag in ('steps', 'repeats', 'batch_size', 'image_size'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be at least 1, got {getattr(args, flag)}')
    device = torch.device(args.device)
    torch.manual_seed(0)
    # as timm's train.py: cuDNN picks each conv's fastest algorithm on the first steps (the warm-up)
    torch.backends.cudnn.benchmark = True

    print(f'device {device}, batch {args.batch_size}, steps {args.steps} x {args.repeats} repeats, amp {args.amp}'
          + (', dropouts redraw in backward' if args.redraw_dropout else ''))
    memory = not args.no_memory and (device.type == 'cuda' or resource is not None)
    cell = len(ratio_cell([1.0], [1.0]))
    print(f'{"model":24s} {"baseline":22s} {"infer img/s":>12s} {"ratio":>{cell}s} {"train img/s":>12s}'
          f' {"ratio":>{cell}s}' + (f' {"train MiB":>10s} {"ratio":>6s}' if memory else '')
          + f' {"fold img/s":>11s} {"ratio":>{cell}s}'
          + (f' {"compiled train":>14s} {"ratio":>{cell}s}' if args.compile else ''))
    groups = {}  # baseline -> its models: each baseline runs once, interleaved with all of them
    for name, baseline in PAIRS:
        if not args.only or name in args.only:
            groups.setdefault(baseline, []).append(name)
    for baseline, names in groups.items():
        try:
            bench_group(baseline, names, args, memory, cell)
        except Exception as e:  # one pair failing (out of memory, an op missing on this device) is reported, not fatal
            print(f'{" ".join(names)} vs {baseline}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}')

    source = timm.create_model('resnet152')
    t = time.perf_counter()
    timm_ic.rewrite(source, 'ic')
    real = time.perf_counter() - t
    with torch.device('meta'):
        source = timm.create_model('resnet152')
    t = time.perf_counter()
    timm_ic.rewrite(source, 'ic')
    meta = time.perf_counter() - t
    print(f'rewrite resnet152 -> ic: {real:.3f} s (real weights), {meta:.3f} s (meta device)')


if __name__ == '__main__':
    main()
