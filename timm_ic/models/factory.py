"""One way to build a model from (name, placement, weights): `create_model`.

train.py, `timm-ic diagnose`, the Hub export (`model_from_run`) and `timm_ic.hub.create_model` all build
through it, so a name, a placement and a weights file mean the same everywhere:

* `name`: a timm registry name (timm-ic's models once `import timm_ic` registered them) or an export,
  `hf-hub:ORG/NAME` / `local-dir:PATH`, whose config.json is checked first (readable, naming an architecture
  timm knows); an unknown name is an `UnknownModelError` listing close matches;
* `placement`: goes to the entrypoint, which only timm-ic's models take (`takes_placement`); for a timm
  model, `PlacementError` (`timm_ic.rewrite(model, placement)` lays a placement over one);
* `weights`: a .safetensors file loaded exactly (every tensor name and shape: `WeightsError` otherwise);
* `pretrained=True` loads the name's own pretrained weights with timm-ic's checks (models/pretrained.py);
  timm's `pretrained_cfg_overlay=dict(file=...)` fine-tunes from a file (a classifier of another size is
  re-initialised), as timm's train.py does.

Callers add their own wording (flag names, exit codes) by catching these errors; the messages already say
what is wrong and how to fix it.
"""
import difflib
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .pretrained import _SAFE_WEIGHTS_NAME, PretrainedWeightsError, _loading_error, _read_export_config

__all__ = ['create_model', 'check_model_name', 'takes_placement', 'load_weights', 'ModelBuildError',
           'UnknownModelError', 'PlacementError', 'WeightsError', 'EXPORT_PREFIXES']

# names timm loads from an export (config.json + model.safetensors) rather than from its registry
EXPORT_PREFIXES = ('hf-hub:', 'hf_hub:', 'local-dir:')


class ModelBuildError(ValueError):
    """A model that cannot be built as asked; the message names the problem and the fix."""


class UnknownModelError(ModelBuildError):
    """A name timm's registry does not know (nor an hf-hub: / local-dir: export)."""


class PlacementError(ModelBuildError):
    """A placement given for a model whose entrypoint takes none (a timm model), or that cannot apply to it."""


class WeightsError(ModelBuildError):
    """A weights file that cannot be read, or does not fit the model (names the file)."""


def check_model_name(name: str) -> None:
    """Fail fast, before anything is built, on a name timm does not know, listing close matches."""
    import timm
    if timm.is_model(name) or name.startswith(EXPORT_PREFIXES):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
    hint = f' Close matches: {", ".join(close)}.' if close else ''
    raise UnknownModelError(f'unknown model {name!r}.{hint} List them all with '
                            f'python -c "import timm, timm_ic; print(timm.list_models(\'*resnet*\'))".')


def takes_placement(name: str) -> bool:
    """Whether `name`'s entrypoint takes `placement=` (timm-ic registered it); False for an export's name."""
    import timm
    from timm.models import model_entrypoint, split_model_name_tag
    arch = split_model_name_tag(name)[0]
    return timm.is_model(arch) and model_entrypoint(arch).__module__.startswith('timm_ic.')


def load_weights(model: nn.Module, path: Union[str, Path]) -> None:
    """Load a .safetensors file into `model` exactly: every tensor name and shape must match (WeightsError)."""
    import safetensors.torch
    path = Path(path)
    if path.suffix != '.safetensors':
        raise WeightsError(f'{path} is not a .safetensors file: only safetensors weights are loaded (convert: '
                           'safetensors.torch.save_file(model.state_dict(), path))')
    if not path.is_file():
        raise WeightsError(f'{path}: weights file not found')
    try:
        state_dict = safetensors.torch.load_file(str(path), device='cpu')
    except Exception as e:  # SafetensorError, OSError: the file, not the model, is at fault
        raise WeightsError(f'{path} is not a readable safetensors file ({e}): corrupt or truncated?') from e
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise WeightsError(f'{path} does not fit the model: {e}') from e


def _from_export(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm.create_model of an hf-hub: / local-dir: name, with config.json checked first and weight loading
    failures as PretrainedWeightsErrors naming the file (timm says only "Unknown model (x)")."""
    import timm
    from timm.models import parse_model_name
    source, model_id = parse_model_name(name)
    where, config = _read_export_config(source, model_id, kwargs.get('cache_dir'))
    architecture = config['architecture']
    if not timm.is_model(architecture):
        raise PretrainedWeightsError(
            f'{where} names architecture {architecture!r}, which is not registered in timm: import the package '
            "that defines it first (`import timm_ic` for timm-ic's models), or upgrade timm / timm-ic.")
    weights = (f'{Path(model_id) / _SAFE_WEIGHTS_NAME}' if source == 'local-dir'
               else f'{_SAFE_WEIGHTS_NAME} of hf-hub:{model_id}')
    if pretrained and source == 'local-dir' and not (Path(model_id) / _SAFE_WEIGHTS_NAME).is_file():
        raise PretrainedWeightsError(f'{weights} not found: timm-ic loads safetensors only; re-export the folder')
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except PretrainedWeightsError:
        raise
    except Exception as e:
        wrapped = _loading_error(e, weights, architecture) if pretrained else None
        if wrapped is None:
            raise
        raise wrapped from e


def create_model(
        name: str,
        placement: Optional[Any] = None,
        weights: Optional[Union[str, Path]] = None,
        pretrained: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """The model `name` with `placement` (a Placement or its string) and `weights` (a .safetensors file).

    `kwargs` are timm.create_model's (num_classes, in_chans, drop_rate, pretrained_cfg_overlay, ...).
    Raises UnknownModelError, PlacementError, WeightsError (ValueErrors) and, with `pretrained`,
    PretrainedWeightsError (see the module docstring).
    """
    import timm
    from timm.models import parse_model_name
    check_model_name(name)
    is_export = name.startswith(EXPORT_PREFIXES)
    if placement is not None:
        if not is_export and not takes_placement(name):
            raise PlacementError(f'{name!r} takes no placement: placements apply to timm-ic models (ic_*, cifar_*, '
                                 'kim_*, uout_*); for a timm model use timm_ic.rewrite(model, placement)')
        kwargs['placement'] = placement
    try:
        if is_export and parse_model_name(name)[0] in ('hf-hub', 'local-dir'):
            model = _from_export(name, pretrained, **kwargs)
        else:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an export's architecture that takes no placement
        if placement is None or 'placement' not in str(e):
            raise
        raise PlacementError(f'{name!r} takes no placement ({e}): placements apply to timm-ic models; for a timm '
                             'model use timm_ic.rewrite(model, placement)') from e
    if weights is not None:
        load_weights(model, weights)
    return model
