"""Pretrained loading with clear errors, on top of timm's own loader.

timm 1.0.31 loads weights in `build_model_with_cfg` -> `load_pretrained`; its messages do not name the file
(`FileNotFoundError()`, safetensors' "Error while deserializing header", "No pretrained weights exist for
x. Use `pretrained=False`"). timm-ic's entrypoints call `build_model_with_checks` instead, which

* fails at once, before building anything, when a tag has no weights, saying how to get them;
* loads safetensors only (a `file`, a `local-dir:` folder's model.safetensors, a Hub `model.safetensors`);
* turns a corrupt or truncated file, a shape mismatch, a missing repo or an offline cache miss into a
  `PretrainedWeightsError` that names the file and the problem.

`timm_ic.models.create_model` (models/factory.py) does the same for `hf-hub:` / `local-dir:` names of any
architecture, checking config.json first (timm itself says only "Unknown model (x)" for an architecture it
does not know).
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from .tags import HUB_NAMESPACE_ENV, hub_cards_dir, hub_namespace, pretrained_tags

__all__ = ['PretrainedWeightsError', 'build_model_with_checks', 'check_pretrained_source']

_SAFE_WEIGHTS_NAME = 'model.safetensors'


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that cannot be loaded; the message names the file (or repo) and the fix."""


def _how_to_get_weights(variant: str) -> str:
    arch = variant.split('.')[0]
    return (
        'To get weights: train them (`python train.py --model {arch} ...`) and push them under your namespace '
        '(`timm-ic push RUN_DIR/hub_export ORG/NAME`, or `train.py --push-to-hub ORG/NAME`), then load with '
        "timm.create_model('hf-hub:ORG/NAME', pretrained=True), or set {env}=ORG to resolve the registry tags "
        "there; or load a local file: timm.create_model('{arch}', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='path/to/model.safetensors')) or 'local-dir:EXPORT_DIR'."
    ).format(arch=arch, env=HUB_NAMESPACE_ENV)


def _resolve_source(cfg: Dict[str, Any]) -> Tuple[str, Any]:
    from timm.models._builder import _resolve_pretrained_source  # timm's own priority of weight sources
    return _resolve_pretrained_source(cfg)


def check_pretrained_source(variant: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Check the weight source of a resolved pretrained cfg before anything is built or downloaded.

    Returns the pretrained_cfg_overlay to add (it pins Hub downloads to model.safetensors)."""
    load_from, location = _resolve_source(cfg)
    name = f"{cfg.get('architecture') or variant}" + (f".{cfg['tag']}" if cfg.get('tag') else '')
    if not load_from:
        published = [t for t in pretrained_tags(published_only=True) if t.split('.')[0] == variant.split('.')[0]]
        where = (f'under the Hub namespace {hub_namespace()!r}' if published or os.environ.get(HUB_NAMESPACE_ENV)
                 else f'(hub_cards/models.yaml in {hub_cards_dir()} lists no published tag for it)')
        raise PretrainedWeightsError(
            f'No pretrained weights for {name}: this tag was never published {where}. '
            + (f'Tags with weights: {published}. ' if published else '') + _how_to_get_weights(variant))
    if load_from == 'file':
        path = Path(location)
        if not str(path).endswith('.safetensors'):
            raise PretrainedWeightsError(
                f'{path}: timm-ic loads pretrained weights from safetensors only. Convert it: '
                'safetensors.torch.save_file(torch.load(path, weights_only=True), "model.safetensors")')
        if not path.is_file():
            raise PretrainedWeightsError(f'{path}: pretrained weights file not found')
    elif load_from == 'local-dir':
        path = Path(location) / _SAFE_WEIGHTS_NAME
        if not path.is_file():
            raise PretrainedWeightsError(f'{path} not found: a local-dir: export must hold {_SAFE_WEIGHTS_NAME} '
                                         '(timm-ic loads safetensors only; re-export with `timm-ic export`)')
    elif load_from == 'hf-hub':
        if isinstance(location, (tuple, list)):
            if not str(location[1]).endswith('.safetensors'):
                raise PretrainedWeightsError(f'hf-hub:{location[0]} names weights file {location[1]!r}: timm-ic '
                                             'loads safetensors only')
        else:
            return {'hf_hub_filename': _SAFE_WEIGHTS_NAME}
    elif load_from == 'url':
        raise PretrainedWeightsError(f'{location}: timm-ic does not load weights from URLs (torch pickles); '
                                     'publish safetensors on the Hub or pass pretrained_cfg_overlay=dict(file=...)')
    return {}


def _weights_location(cfg: Dict[str, Any], overlay: Dict[str, Any]) -> str:
    """The file (or Hub file, with its cache path when cached) that the loader reads, for messages."""
    load_from, location = _resolve_source({**cfg, **overlay})
    if load_from == 'file':
        return str(location)
    if load_from == 'local-dir':
        return str(Path(location) / _SAFE_WEIGHTS_NAME)
    if load_from == 'hf-hub':
        repo, filename = location if isinstance(location, (tuple, list)) else (location, _SAFE_WEIGHTS_NAME)
        repo_id, _, revision = repo.partition('@')
        text = f'{filename} of hf-hub:{repo}'
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(cached, str):
                text += f' (cached at {cached})'
        except Exception:  # naming the cache path is a courtesy, never a new failure
            pass
        return text
    return 'the pretrained state_dict'


def _loading_error(err: BaseException, where: str, variant: str) -> Optional[PretrainedWeightsError]:
    """A PretrainedWeightsError explaining `err`, or None when `err` is not about the weights."""
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)
    text = str(err)
    if type(err).__name__ == 'SafetensorError' or 'deserializing header' in text or 'incomplete metadata' in text:
        return PretrainedWeightsError(
            f'{where} is not a readable safetensors file ({text}): it is corrupt or truncated. Re-download it '
            '(delete it from the cache, or pass force_download via huggingface_hub) or export it again.')
    if isinstance(err, LocalEntryNotFoundError) or isinstance(err, OfflineModeIsEnabled):
        return PretrainedWeightsError(
            f'{where} is not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no '
            'network): load it once online, or point HF_HUB_CACHE at a cache that has it.')
    if isinstance(err, RepositoryNotFoundError):
        return PretrainedWeightsError(
            f'{where}: the repository does not exist on the Hub (or is private to another account). '
            + _how_to_get_weights(variant))
    if isinstance(err, EntryNotFoundError):
        return PretrainedWeightsError(f'{where}: the repository has no such file; it was not made by '
                                      '`timm-ic export` (which writes model.safetensors).')
    if isinstance(err, HfHubHTTPError):
        return PretrainedWeightsError(f'{where}: the Hub refused the download: {text}')
    if isinstance(err, RuntimeError) and ('Error(s) in loading state_dict' in text or 'size mismatch' in text
                                          or 'is inconsistent with input_size' in text):
        return PretrainedWeightsError(
            f'{where} does not fit the model {variant}: {text}\nThe weights were saved from another architecture, '
            'placement or width. Load an export with its own config: '
            "timm.create_model('hf-hub:ORG/NAME') or 'local-dir:PATH' rebuild the model it was saved from.")
    if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__module__.split('.')[0] in ('httpx',
                                                                                                  'httpx2'):
        return PretrainedWeightsError(f'{where}: the Hub could not be reached ({type(err).__name__}: {text}); '
                                      'check the network, or set HF_HUB_OFFLINE=1 to use the local cache.')
    return None


def build_model_with_checks(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """`timm.models.build_model_with_cfg` with timm-ic's pretrained checks (see the module docstring).

    A drop-in for timm-ic's entrypoints: same arguments, same result."""
    # from its module, not timm.models: stays timm's function even where timm.models' name is patched
    from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg

    overlay = dict(pretrained_cfg_overlay or {})
    where = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg, overlay).to_dict()
        overlay.update(check_pretrained_source(variant, cfg))
        where = _weights_location(cfg, overlay)
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg,
                                    pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as e:
        wrapped = _loading_error(e, where, variant) if pretrained else None
        if wrapped is None:
            raise
        raise wrapped from e


def _read_export_config(source: str, model_id: str, cache_dir: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(config path, parsed config.json) of an `hf-hub:` / `local-dir:` source, with errors naming it."""
    if source == 'local-dir':
        path = Path(model_id) / 'config.json'
        if not path.is_file():
            raise PretrainedWeightsError(f'{path} not found: local-dir: needs a folder made by `timm-ic export` '
                                         '(model.safetensors, config.json, README.md)')
        where = str(path)
    else:
        from huggingface_hub import hf_hub_download
        repo_id, _, revision = model_id.partition('@')
        where = f'config.json of hf-hub:{model_id}'
        try:
            path = Path(hf_hub_download(repo_id, 'config.json', revision=revision or None, cache_dir=cache_dir))
        except Exception as e:
            wrapped = _loading_error(e, where, repo_id.split('/')[-1])
            if wrapped is None:
                raise
            raise wrapped from e
        where = f'{where} (cached at {path})'
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedWeightsError(f'{where} is not valid JSON: {e}') from e
    if not isinstance(config, dict) or not config.get('architecture'):
        raise PretrainedWeightsError(f'{where} has no "architecture": not a timm config.json')
    return where, config
