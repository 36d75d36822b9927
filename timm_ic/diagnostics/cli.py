"""`timm-ic diagnose`: every diagnostic on one or more models, with figures, a JSON report and a table."""
import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.factory import EXPORT_PREFIXES
from ..run_record import RunRecord, RunRecordError

__all__ = ['register', 'run_diagnose', 'build_model', 'check_inputs', 'DiagnoseError']

# `timm.create_model` names that load their own weights from somewhere other than the registry
_PRETRAINED_PREFIXES = EXPORT_PREFIXES


class DiagnoseError(ValueError):
    """Bad input to `timm-ic diagnose`; the message names the problem and the fix."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `diagnose` sub-command."""
    p = subparsers.add_parser(
        'diagnose', help='variance shift, BN recalibration, correlation/MI at dropouts, signal propagation',
        description=__doc__ + ' Without --checkpoint the weights are at initialisation and BN running statistics '
        'are first estimated with dropout on (what training accumulates), so the variance shift is that of the '
        'architecture.')
    p.add_argument('--model', required=True,
                   help='timm model name (e.g. ic_resnet20, resnet18) or hf-hub:/local-dir: id')
    p.add_argument('--placement', default=None, help='placement for --model (e.g. before_bn, "ic:drop=uout,beta=0.1")')
    p.add_argument('--checkpoint', default=None, help='weights for --model: a .safetensors file')
    p.add_argument('--compare', nargs='+', default=[], metavar='NAME_OR_PLACEMENT[@FILE.safetensors]',
                   help='more models (timm names) or placements of --model to measure and draw beside it')
    p.add_argument('--data', default=None, metavar='DIR',
                   help='ImageNet-layout folder (DIR/train/<class>/*.jpg), or the root of --dataset torch/NAME; '
                   'default: the embedded digits')
    p.add_argument('--dataset', default=None, metavar='torch/NAME',
                   help='a torchvision data set as train.py takes it (torch/fashion_mnist, torch/mnist, torch/kmnist, '
                   'torch/cifar10, torch/cifar100); its training split is read')
    p.add_argument('--dataset-download', action='store_true',
                   help='--dataset torch/NAME: let torchvision download it into --data (needs a network)')
    p.add_argument('--out', required=True, help='output folder for report.json and the PNG figures')
    p.add_argument('--batches', type=int, default=8, help='training batches read per diagnostic (default 8)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--img-size', type=int, default=None,
                   help="input size; default the model's (timm pretrained_cfg), for the digits 16 as in train.py's "
                   'digits_demo recipe')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--bf16', action='store_true', help='run the forward passes under bf16 autocast')
    p.add_argument('--no-recalibrate', action='store_true', help='skip the variance shift after BN recalibration')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=0, help='data loader worker processes')
    p.set_defaults(func=run_diagnose)


@dataclass
class ModelSpec:
    """One model to diagnose: a registered name, an optional placement and an optional checkpoint."""
    model: str
    placement: Optional[Any] = None  # timm_ic.Placement
    checkpoint: Optional[str] = None

    @property
    def label(self) -> str:
        return f'{self.model} [{self.placement}]' if self.placement is not None else self.model


def _check_model_name(name: str) -> None:
    from timm_ic.models.factory import UnknownModelError, check_model_name
    try:
        check_model_name(name)
    except UnknownModelError as e:
        raise DiagnoseError(str(e)) from None


def _parse_placement(text: str, flag: str):
    from timm_ic.placement import PRESETS, Placement
    try:
        return Placement.parse(text)
    except (ValueError, TypeError) as e:
        what = 'neither a registered model name nor a placement' if flag == '--compare' else 'not a placement'
        raise DiagnoseError(f'{flag} {text!r} is {what} ({e}); a placement is a preset ({", ".join(PRESETS)}) '
                            'with optional overrides, e.g. "ic:drop=uout,beta=0.1"') from e


def parse_specs(args: argparse.Namespace) -> List[ModelSpec]:
    """--model (with --placement/--checkpoint) first, then each --compare entry: a model name or a placement,
    optionally followed by @FILE.safetensors."""
    import timm
    _check_model_name(args.model)
    placement = _parse_placement(args.placement, '--placement') if args.placement else None
    specs = [ModelSpec(args.model, placement, args.checkpoint)]
    for entry in args.compare:
        what, _, checkpoint = entry.partition('@')
        if timm.is_model(what) or what.startswith(_PRETRAINED_PREFIXES):
            specs.append(ModelSpec(what, None, checkpoint or None))
        else:
            specs.append(ModelSpec(args.model, _parse_placement(what, '--compare'), checkpoint or None))
    return specs


def _run_record_beside(checkpoint: str) -> Optional[RunRecord]:
    """train.py's run.json next to its weights (placement, data config), or None when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), 'run.json')
    if not os.path.isfile(path):
        return None
    try:
        return RunRecord.read(path)
    except (OSError, RunRecordError) as e:  # unreadable, not JSON, not a run record this version reads
        raise DiagnoseError(f'{e}: it is the run record beside checkpoint {checkpoint}, which would give the '
                            'placement and preprocessing; repair or remove it (then --placement and --img-size '
                            'say them)') from e


def _check_checkpoint(path: str) -> None:
    """A readable, complete safetensors file (its header covers the file), and a readable run.json beside it."""
    if not path.endswith('.safetensors'):
        raise DiagnoseError(f'checkpoint {path!r} is not a .safetensors file: only safetensors weights '
                            'are loaded (convert: safetensors.torch.save_file(model.state_dict(), path))')
    if not os.path.isfile(path):
        raise DiagnoseError(f'checkpoint {path} does not exist')
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt') as f:
            f.keys()
    except Exception as e:  # SafetensorError, OSError: the file is at fault
        raise DiagnoseError(f'checkpoint {path} is not a readable safetensors file ({e}): truncated or corrupt; '
                            'copy or save it again') from e
    _run_record_beside(path)


def _check_out(out: str) -> None:
    """--out must be a folder that exists or can be made: found before the diagnostics run, not after."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise DiagnoseError(f'--out {out} is a file, not a folder: give a folder for report.json and the figures')
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DiagnoseError(f'--out {out} cannot be created: {parent} is a file, not a folder')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiagnoseError(f'--out {out} cannot be written: no write permission in {parent}')


def check_inputs(args: argparse.Namespace, specs: List[ModelSpec]) -> None:
    """Every input a run could fail on late, checked before anything is computed: --out, each checkpoint
    (and the run.json beside it) and --data (build_dataset checks it)."""
    _check_out(args.out)
    for spec in specs:
        if spec.checkpoint:
            _check_checkpoint(spec.checkpoint)


def build_model(spec: ModelSpec, num_classes: int, in_chans: int) -> Tuple[nn.Module, str, Optional[Dict[str, Any]]]:
    """The model, a description of its weights, and its data config when a train.py run record says it.

    A placement goes to the entrypoint when it takes one (timm_ic models), else through `timm_ic.rewrite`.
    A checkpoint written by train.py brings its run.json: the placement it was trained with (unless the spec
    gives one) and its preprocessing (input size, mean, std).
    """
    from timm_ic.models.factory import WeightsError, create_model, load_weights, takes_placement
    kwargs = dict(num_classes=num_classes, in_chans=in_chans)
    placement, data_config = spec.placement, None
    if spec.checkpoint:
        _check_checkpoint(spec.checkpoint)
        record = _run_record_beside(spec.checkpoint)
        if record is not None and record.model == spec.model:
            placement = placement if placement is not None else record.placement
            data_config = record.data_config or None
    pretrained = spec.model.startswith(_PRETRAINED_PREFIXES)
    if not pretrained and not spec.checkpoint:
        # timm zero-initialises each residual branch (its last norm or last conv) for training from scratch; at
        # init that silences every branch and the signal measures would see the skip alone
        kwargs['zero_init_last'] = False
    # the entrypoint takes the placement when it can (timm_ic models); a timm model is rewritten, and a
    # checkpoint (of the rewritten network) loaded after that
    rewritten = placement is not None and not takes_placement(spec.model)

    def weights_do_not_fit(e: WeightsError) -> DiagnoseError:
        return DiagnoseError(f'{spec.checkpoint} does not fit {spec.label} with num_classes={num_classes}, '
                             f'in_chans={in_chans}: {e}')

    def build() -> nn.Module:
        try:
            return create_model(spec.model, placement=None if rewritten else placement,
                                weights=None if rewritten else spec.checkpoint, pretrained=pretrained, **kwargs)
        except WeightsError as e:
            raise weights_do_not_fit(e) from e

    try:
        model = build()
    except TypeError:  # a family without residual branches (or without the option)
        if kwargs.pop('zero_init_last', None) is None:
            raise
        model = build()
    if rewritten:
        from timm_ic.rewriter import rewrite
        model = rewrite(model, placement)
        if spec.checkpoint:
            try:
                load_weights(model, spec.checkpoint)
            except WeightsError as e:
                raise weights_do_not_fit(e) from e
    weights = 'pretrained' if pretrained else 'init'
    if 'zero_init_last' in kwargs:
        weights += ' (residual branches not zero-initialised: zero_init_last=False)'
    if spec.checkpoint:
        weights = spec.checkpoint
    return model, weights, data_config


def _digits_data_config(model: nn.Module, img_size: Optional[int]) -> Dict[str, Any]:
    """The preprocessing of train.py's digits demo recipe (size, mean, std), so its checkpoints see what they
    were trained on."""
    from timm.data import resolve_data_config

    from timm_ic.data import DIGITS_INPUT_SIZE, DIGITS_MEAN, DIGITS_STD
    size = img_size or DIGITS_INPUT_SIZE[-1]
    return resolve_data_config(dict(input_size=(1, size, size), crop_pct=1.0, mean=DIGITS_MEAN, std=DIGITS_STD),
                               model=model)


def _torch_data_config(model: nn.Module, dataset: str, img_size: Optional[int]) -> Dict[str, Any]:
    """Preprocessing for a torch/NAME data set: the fashion_mnist recipe's for Fashion-MNIST (what train.py
    trains with); else the model's, with a colour model's mean and std averaged for grey images."""
    from timm.data import resolve_data_config

    from timm_ic.data import FASHION_MNIST_INPUT_SIZE, FASHION_MNIST_MEAN, FASHION_MNIST_STD, default_in_chans
    chans = default_in_chans(dataset)
    overrides: Dict[str, Any] = {'in_chans': chans}
    if dataset.lower() == 'torch/fashion_mnist':
        overrides.update(input_size=FASHION_MNIST_INPUT_SIZE, crop_pct=1.0, mean=FASHION_MNIST_MEAN,
                         std=FASHION_MNIST_STD)
    else:
        cfg = getattr(model, 'pretrained_cfg', {}) or {}
        for key in ('mean', 'std'):
            if len(cfg.get(key) or ()) not in (0, chans):
                overrides[key] = (sum(cfg[key]) / len(cfg[key]),) * chans
    if img_size:
        overrides['input_size'] = (chans, img_size, img_size)
    return resolve_data_config(overrides, model=model)


def _build_torch_dataset(data: Optional[str], dataset: str, download: bool):
    from timm_ic.data import DataError, build_torch_datasets, default_in_chans
    mode = 'L' if default_in_chans(dataset) == 1 else 'RGB'
    try:
        return build_torch_datasets(dataset, data, download=download, input_img_mode=mode)[0]
    except DataError as e:
        raise DiagnoseError(str(e).replace('--data-dir', '--data')) from e


def build_dataset(data: Optional[str], model: Optional[nn.Module] = None, img_size: Optional[int] = None,
                  data_config: Optional[Dict[str, Any]] = None, dataset: Optional[str] = None,
                  download: bool = False):
    """The training split: embedded digits by default, else an ImageNet-layout folder or a torch/NAME data set
    (via `timm.data.create_dataset`); with `model`, timm's eval transforms for it (or for `data_config`)."""
    from timm.data import create_dataset, create_transform, resolve_data_config
    if dataset:
        if not dataset.lower().startswith('torch/'):
            raise DiagnoseError(f'--dataset {dataset!r}: give a torchvision data set, torch/NAME (e.g. '
                                'torch/fashion_mnist); for image folders use --data DIR alone')
        torch_ds = _build_torch_dataset(data, dataset, download)
        if model is not None:
            config = data_config or _torch_data_config(model, dataset, img_size)
            torch_ds.transform = create_transform(**config, is_training=False)
        return torch_ds
    if data is None:
        from timm_ic.data import DigitsDataset
        if model is None:
            return DigitsDataset('train')
        config = data_config or _digits_data_config(model, img_size)
        return DigitsDataset('train', transform=create_transform(**config, is_training=False))
    if not os.path.isdir(data):
        raise DiagnoseError(f'--data {data} is not a folder: give an ImageNet-layout folder (DIR/train/<class>/*.jpg) '
                            'or leave --data out for the embedded digits')
    try:
        dataset = create_dataset('', root=data, split='train')
    except (RuntimeError, OSError) as e:  # timm: 'Found 0 images in subfolders of ...'
        raise DiagnoseError(f'--data {data}: no images found ({e}); it needs train/<class>/ image folders') from e
    if len(dataset) == 0:
        raise DiagnoseError(f'no images found under {data}: it needs train/<class>/ image folders')
    if model is not None:
        config = data_config or resolve_data_config(
            {'input_size': (3, img_size, img_size)} if img_size else {}, model=model)
        dataset.transform = create_transform(**config, is_training=False)
    return dataset


def _num_classes(dataset) -> int:
    classes = getattr(dataset, 'classes', None)
    if classes is None:
        reader = getattr(dataset, 'reader', None)
        classes = getattr(reader, 'class_to_idx', None)
    if not classes:
        raise DiagnoseError('the data set does not say its classes: use an ImageNet-layout folder')
    return len(classes)


def run_diagnose(args: argparse.Namespace) -> int:
    """The `diagnose` sub-command; returns the exit status (2 on bad input, with the reason on stderr)."""
    try:
        return _diagnose(args)
    except DiagnoseError as e:
        print(f'timm-ic diagnose: error: {e}', file=sys.stderr)
        return 2


def _diagnose(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import timm_ic  # noqa: F401  (registers the timm_ic models)
    from timm_ic._versions import library_versions

    from ._common import running_stat_norms
    from .plots import plot_correlation, plot_gradient_norm, plot_signal, plot_variance_shift
    from .report import build_report, format_table, write_report
    from .run import DIAGNOSTIC_STEPS, diagnose_model
    from .variance_shift import recalibrate_bn

    if args.batches < 1 or args.batch_size < 2:
        raise DiagnoseError('--batches must be >= 1 and --batch-size >= 2 (BatchNorm needs 2 samples per batch)')
    specs = parse_specs(args)
    check_inputs(args, specs)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.dataset:
        from timm_ic.data import default_in_chans
        in_chans = default_in_chans(args.dataset)
        num_classes = _num_classes(build_dataset(args.data, dataset=args.dataset, download=args.dataset_download))
    else:
        in_chans = 1 if args.data is None else 3
        num_classes = 10 if args.data is None else _num_classes(build_dataset(args.data))
    results = []
    torch.manual_seed(args.seed)
    with tqdm(total=len(specs) * (1 + len(DIAGNOSTIC_STEPS)), desc='diagnose', unit='step') as bar:
        for spec in specs:
            label = spec.label
            if any(r.label == label for r in results):
                label = f'{label} #{sum(r.label.startswith(label) for r in results) + 1}'
            bar.set_postfix_str(f'{label}: build')
            model, weights, data_config = build_model(spec, num_classes, in_chans)
            dataset = build_dataset(args.data, model, args.img_size, data_config, args.dataset, args.dataset_download)
            if len(dataset) < args.batch_size:
                raise DiagnoseError(f'the data has {len(dataset)} images, fewer than --batch-size {args.batch_size}')
            # one fixed random sample of the training data for every diagnostic and model
            chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, chosen[:args.batches * args.batch_size].tolist()),
                batch_size=args.batch_size, shuffle=False, drop_last=True, num_workers=args.workers)
            # the next images, never used for any statistic: where recalibration is checked
            rest = chosen[args.batches * args.batch_size:2 * args.batches * args.batch_size].tolist()
            heldout = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, rest), batch_size=args.batch_size, shuffle=False, drop_last=True,
                num_workers=args.workers) if len(rest) >= args.batch_size else None
            model.to(device)
            if weights.startswith('init') and running_stat_norms(model):
                # untrained running statistics (mean 0, var 1) say nothing: estimate them as training would
                recalibrate_bn(model, loader, num_batches=args.batches, train_mode=True, autocast=args.bf16)
                weights += ('; BN running statistics estimated over the diagnostic batches in train mode '
                            '(dropout on), as training accumulates them')
            bar.update(1)

            def step_done(step: str, _label: str = label) -> None:
                bar.set_postfix_str(f'{_label}: {step}')
                bar.update(1)

            result = diagnose_model(model, loader, num_batches=args.batches, label=label,
                                    recalibrate=not args.no_recalibrate, autocast=args.bf16, progress=step_done,
                                    heldout=heldout)
            result.model, result.weights = spec.model, weights
            results.append(result)
    data_name = f'{args.dataset} (train)' if args.dataset else (args.data or 'embedded digits (train)')
    settings = dict(batches=args.batches, batch_size=args.batch_size, data=data_name,
                    device=str(device), bf16=args.bf16, seed=args.seed, versions=library_versions())
    files = [write_report(build_report(results, settings), os.path.join(args.out, 'report.json'))]
    by_label = {r.label: r for r in results}
    shifts = {k: r.variance_shift for k, r in by_label.items() if r.variance_shift}
    if shifts:
        recal = {k: r.variance_shift_recalibrated for k, r in by_label.items() if r.variance_shift_recalibrated}
        files.append(plot_variance_shift(shifts, os.path.join(args.out, 'variance_shift.png'), recal or None))
    signals = {k: r.signal for k, r in by_label.items() if r.signal}
    files.append(plot_signal(signals, os.path.join(args.out, 'signal.png')))
    files.append(plot_gradient_norm(signals, os.path.join(args.out, 'gradient_norm.png')))
    correlations = {k: r.correlation for k, r in by_label.items() if r.correlation}
    if correlations:
        files.append(plot_correlation(correlations, os.path.join(args.out, 'correlation.png')))
    print(format_table(results))
    print('\nwrote ' + ', '.join(files))
    return 0
