"""The model `train.py` trains: built from its options, and the checks on what they name.

Models are built by `timm_ic.models.create_model`, the package's one way to build a model; this module turns
the command line into its arguments and its errors into `UsageError`s (exit 2).
"""
import argparse
import os
from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch.nn as nn

from .. import models
from .errors import UsageError


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



def check_model_name(name: str) -> None:
    """Fail fast on a model name timm does not know, listing close matches (timm_ic.models.check_model_name)."""
    try:
        models.check_model_name(name)
    except models.UnknownModelError as e:
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
        model = models.create_model(args.model, placement=args.placement or None, pretrained=pretrained, **kwargs)
    except models.PlacementError as e:
        raise UsageError(f'--placement works with timm-ic models (ic_*, cifar_*, kim_*, uout_*), not with '
                         f'{args.model!r}; for timm models use timm_ic.rewrite(model, placement) in Python.') from e
    except (OSError, ValueError, RuntimeError) as e:
        from_export = args.model.startswith(models.EXPORT_PREFIXES)
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

