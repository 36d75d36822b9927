"""Export a model, or a `train.py` run folder, as a folder timm loads with `hf-hub:` / `local-dir:`.

The folder holds `model.safetensors`, timm's `config.json` and `README.md` (the model card), and is
written atomically: into a temporary folder beside `out_dir`, then renamed into place. An existing `out_dir`
is replaced only when it is empty or an earlier export (those three files, the config.json ours); non-finite
weights are refused, and config.json is strict JSON (a non-finite run value becomes null, listed under
`timm_ic.non_finite`). `verify_export` checks a folder before it is published.

config.json is written here rather than by timm 1.0.31's `save_config_for_hf` (private, in timm.models._hub):
it drops `*drop_rate` kwargs unless passed again and needs the placement's string form passed too, and it starts
from the model's own pretrained_cfg, so a fine-tuned model's export would keep its source weights' `tag`
(`description`, `notes` ...); the pretrained_cfg is built here anyway (data config, per-channel mean/std,
license, papers, `hf_hub_filename`), so it would save no code. The layout is timm's (`architecture`,
`num_classes`, `label_names`, `model_args`, `pretrained_cfg`), with timm-ic's own record under the top-level
key `timm_ic`, which timm ignores.

A run folder, as train.py writes it, holds `run.json` (a `timm_ic.training.run_record.RunRecord`, schema
timm_ic.run_record/1; `RunRecord.read` refuses one it does not understand) and `best.safetensors` (else
`last.safetensors` is exported). The fields used here:
    model            the --model name, e.g. 'ic_resnet20'; a run fine-tuned from 'hf-hub:ORG/NAME',
                     'local-dir:PATH' or a tagged name ('ic_resnet20.demo_digits') is exported as the architecture
                     its pretrained_cfg names (else the name without its tag)
    model_args       kwargs the model was created with (JSON), e.g. {'placement': 'ic', 'drop_rate': 0.1}
    placement        the placement string (wins over model_args['placement'])
    num_classes, in_chans, label_names
    metrics / epochs measured top1 / top5 (percent) of the best epoch for best.safetensors, eval_top1 / eval_top5
                     of the last epoch for last.safetensors
    dataset          {'key', 'name': 'digits' | 'hfds/<hub id>' | 'folder', 'data_dir', 'hub_id', ...}
    recipe           {'name', 'path', 'values'} or null
    args             the command-line arguments (dict)
    versions         {'timm': .., 'torch': .., ...}
    pretrained_cfg, data_config   the model's cfg and the data config it was trained with (input_size, mean, ...)
    status           'finished', or the card says the run did not finish
"""
import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from .._atomic import finite_json, publish_folder
from ..models.factory import WeightsError, create_model, takes_placement
from ..models.tags import card_entry, load_hub_cards, papers_for, pretrained_cfgs
from .cards import render_card
from .stats import count_model_stats
from ..run_record import RunRecord, RunRecordError

__all__ = ['export', 'read_run', 'model_from_run', 'verify_export', 'ExportError', 'RunRecordError', 'RUN_RECORD',
           'RUN_WEIGHTS', 'EXPORT_FILES']

RUN_RECORD = 'run.json'
RUN_WEIGHTS = ('best.safetensors', 'last.safetensors')  # preferred first
EXPORT_FILES = ('model.safetensors', 'config.json', 'README.md')
_SOURCE_KEYS = {'url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'tag', 'architecture'}
# fields describing the weights a model was created from, not the weights being exported
_SOURCE_WEIGHT_FIELDS = {'description', 'origin_url', 'paper_name', 'paper_ids', 'notes', 'license'}
_NOT_MODEL_ARGS = {'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'checkpoint_path',
                   'features_only', 'out_indices', 'feature_cls', 'device', 'dtype', 'pretrained_model_args',
                   'scriptable', 'exportable', 'no_jit'}
_DATA_CFG_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'crop_mode', 'test_input_size')


class ExportError(ValueError):
    """An export that must not be written or published (non-finite weights, a folder whose files do not make
    a loadable model); names the file and what is wrong."""


def read_run(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """run.json of a train.py run folder (`RunRecord.read`), as the export uses it (see the module docstring),
    plus `weights`: the path of best.safetensors, else last.safetensors."""
    run_dir = Path(run_dir)
    record_path = run_dir / RUN_RECORD
    if not run_dir.is_dir():
        raise RunRecordError(f'{run_dir} is not a folder: give a train.py output folder or a model')
    if not record_path.is_file():
        raise RunRecordError(f'{record_path} not found: {run_dir} is not a train.py output folder '
                             f'(it writes {RUN_RECORD} beside {" / ".join(RUN_WEIGHTS)})')
    record = RunRecord.read(record_path)
    model = _run_architecture(record.model, record, record_path)
    model_args = dict(record.model_args)
    placement = record.placement or model_args.get('placement')
    if placement is not None:
        model_args['placement'] = str(placement)
    for key in ('num_classes', 'in_chans'):
        value = getattr(record, key)
        if value is not None:
            model_args.setdefault(key, int(value))
    weights = next((run_dir / w for w in RUN_WEIGHTS if (run_dir / w).is_file()), None)
    if weights is None:
        raise RunRecordError(f'{run_dir} has {RUN_RECORD} but no weights ({" or ".join(RUN_WEIGHTS)}); '
                             'export after the first evaluation has saved them')
    return {
        'run_dir': run_dir,
        'weights': weights,
        'model': model,
        'model_args': model_args,
        'placement': None if placement is None else str(placement),
        'label_names': record.label_names,
        'metrics': _run_metrics(record, best=weights.name == RUN_WEIGHTS[0]),
        'dataset': record.dataset,
        'recipe': record.recipe,
        'args': record.args or None,
        'versions': record.versions or None,
        # the data config the run trained with, over the model's own pretrained_cfg
        'data_config': {**record.pretrained_cfg, **record.data_config},
        'status': record.status,
    }


def _run_architecture(name: str, record: RunRecord, record_path: Path) -> str:
    """The registered architecture behind a run's --model: train.py records the name as given, which may be
    'hf-hub:ORG/NAME', 'local-dir:PATH' or '<arch>.<tag>', none of which rebuilds the fine-tuned model
    (nor should: a hub name would fetch the source weights). The model's pretrained_cfg names its architecture."""
    from timm.models import parse_model_name, split_model_name_tag
    cfg = record.pretrained_cfg
    arch = cfg.get('architecture') if isinstance(cfg.get('architecture'), str) and cfg['architecture'] else name
    try:
        source = parse_model_name(arch)[0]  # 'hf-hub' / 'local-dir' for a prefixed name, None for a registry name
    except ValueError:  # a bare repo id or path
        source = 'path'
    if source is not None:
        raise RunRecordError(f'{record_path} names model {name!r} and its pretrained_cfg records no architecture, '
                             'so the run cannot be rebuilt: add "architecture" (the config.json architecture of '
                             f'{name}) to its pretrained_cfg')
    return split_model_name_tag(arch)[0]


def _run_metrics(record: RunRecord, best: bool) -> Optional[Dict[str, Any]]:
    """Measured top-1/top-5 (percent) of the exported weights: the best epoch's (`metrics`) for
    best.safetensors, the last epoch's (`epochs`) for last.safetensors."""
    if best:
        row = record.metrics or {}
        out = {k: row.get(k) for k in ('top1', 'top5', 'loss', 'epoch')}
    else:
        row = record.epochs[-1] if record.epochs else {}
        out = {'top1': row.get('eval_top1'), 'top5': row.get('eval_top5'), 'loss': row.get('eval_loss'),
               'epoch': row.get('epoch')}
    return {k: v for k, v in out.items() if v is not None} or None


def model_from_run(run: Union[str, Path, Dict[str, Any]]) -> nn.Module:
    """Rebuild the model of a run folder (or a `read_run` record) and load its weights, in eval mode."""
    import timm
    run = read_run(run) if not isinstance(run, dict) else run
    if not timm.is_model(run['model']):
        raise RunRecordError(f"{run['run_dir'] / RUN_RECORD} names model {run['model']!r}, which timm does not "
                             'know: `import timm_ic` (or the package registering it) first')
    model_args = dict(run['model_args'])
    try:
        model = create_model(run['model'], placement=model_args.pop('placement', None), weights=run['weights'],
                             **model_args)
    except WeightsError as e:
        text = str(e).replace('does not fit the model', 'does not match the model its run.json describes')
        raise RunRecordError(text) from e
    return model.eval()


def _non_finite_tensors(state_dict: Dict[str, Any]) -> List[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    import torch
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _check_finite(state_dict: Dict[str, Any], where: str) -> None:
    bad = _non_finite_tensors(state_dict)
    if bad:
        names = ', '.join(bad[:8]) + (f' and {len(bad) - 8} more' if len(bad) > 8 else '')
        raise ExportError(f'{where}: {len(bad)} of {len(state_dict)} tensors hold NaN or inf ({names}); weights '
                          'of a run that diverged would load without error and predict nothing. Export earlier '
                          'weights (a checkpoint before the divergence), or train again (lower --lr, --clip-grad)')


def _model_args(model: nn.Module, extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    # what timm.create_model recorded, then the caller's, then the model's actual placement (authoritative)
    args = {k: v for k, v in dict(getattr(model, '_model_args', None) or {}).items() if k not in _NOT_MODEL_ARGS}
    args.update(extra or {})
    placement = getattr(model, 'placement', None)
    if placement is not None:
        args['placement'] = str(placement)
    elif 'placement' in args:
        args['placement'] = str(args['placement'])
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(f'model argument {key}={value!r} is not JSON; pass model_args={{{key!r}: <its '
                             'string form>}} so config.json can rebuild the model') from None
    return args


def _in_chans(model: nn.Module, cfg: Dict[str, Any]) -> int:
    first_conv = cfg.get('first_conv')
    for name in ([first_conv] if isinstance(first_conv, str) else list(first_conv or [])):
        try:
            return int(model.get_submodule(name).in_channels)
        except (AttributeError, TypeError):
            pass
    return int((cfg.get('input_size') or (3,))[0])


def _dataset_info(value: Any) -> Optional[Dict[str, Any]]:
    """A run's dataset as card data: {'key', 'name', 'hub_id', 'source'}."""
    if value is None or value == '':
        return None
    datasets = load_hub_cards()['datasets']
    if isinstance(value, dict):
        if 'hub_id' in value or 'key' in value:  # already card data; a known key's name and Hub id win
            key = value.get('key')
            base = dict(datasets.get(key, {}), key=key) if key in datasets else {}
            return {**{k: v for k, v in value.items() if v is not None and k != 'data_dir'}, **base}
        # train.py's record: {name, data_dir, train_split, ...}; 'folder' means an image folder at data_dir
        name = value.get('name')
        if name in (None, '', 'folder'):
            return _dataset_info(value.get('data_dir')) if value.get('data_dir') else None
        return _dataset_info(name)
    text = str(value)
    if text in datasets:
        return {'key': text, **datasets[text]}
    for prefix in ('hfds/', 'hf-hub:', 'hf://datasets/', 'wds/'):
        if prefix == 'wds/' and text.startswith(prefix):
            return {'name': text[len(prefix):], 'hub_id': None}
        if text.startswith(prefix):
            hub_id = text[len(prefix):].split(':')[0]
            known = next((k for k, d in datasets.items() if d.get('hub_id') == hub_id), None)
            return {'key': known, **datasets[known]} if known else {'name': hub_id, 'hub_id': hub_id}
    return {'name': Path(text).name or text, 'hub_id': None}


def _public(value: Any) -> Any:
    """`value` without local absolute paths (a card is public; the run folder's layout is not)."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return '<local path>'
    return value


def _feature_channels(model: nn.Module) -> Optional[List[int]]:
    info = getattr(model, 'feature_info', None)
    try:
        return [int(f['num_chs']) for f in info] if info is not None else None
    except (TypeError, KeyError):
        try:
            return list(info.channels())
        except Exception:
            return None


def _is_our_config(path: Path) -> bool:
    """Whether `path` is a config.json that `export` wrote (it carries timm-ic's own `timm_ic` record)."""
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return isinstance(config, dict) and isinstance(config.get('timm_ic'), dict) and 'architecture' in config


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or an earlier export: replacing removes the whole folder,
    so it may hold only files `export` writes, with a config.json of ours."""
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f'{out_dir} exists and overwrite=False (--no-overwrite): choose another output '
                              'folder, or allow replacing an earlier export (overwrite=True; on the command line, '
                              'leave out --no-overwrite)')
    if out_dir.is_symlink() or not out_dir.is_dir():
        what = 'a symbolic link' if out_dir.is_symlink() else 'not a folder'
        raise FileExistsError(f'{out_dir} exists and is {what}: choose another output folder')
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    foreign = [p.name for p in entries if p.name not in EXPORT_FILES or p.is_symlink() or not p.is_file()]
    config = out_dir / 'config.json'
    if foreign or not config.is_file():
        kept = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
        what = f'holds {kept}, which `timm-ic export` did not write' if foreign else 'has no config.json'
        raise FileExistsError(f'{out_dir} holds no export of timm-ic to replace: it {what}, and replacing the folder '
                              'would delete everything in it. Nothing was changed: choose a new or empty output '
                              'folder')
    if not _is_our_config(config):
        raise FileExistsError(f'{out_dir} holds no export of timm-ic to replace: its config.json was not written by '
                              '`timm-ic export` (no "timm_ic" record); replacing the folder would delete it. Nothing '
                              'was changed: choose a new or empty output folder')


def _write_folder_atomically(out_dir: Path, write, overwrite: bool) -> None:
    out_dir = out_dir.absolute()
    _check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', suffix='.tmp', dir=out_dir.parent))
    try:
        write(tmp)
        publish_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_constant(name: str) -> Any:
    raise ValueError(f'bare {name} is not JSON')


def _shape_differences(expected: Dict[str, tuple], found: Dict[str, tuple]) -> str:
    parts = []
    for what, names in (('missing', sorted(set(expected) - set(found))),
                        ('unexpected', sorted(set(found) - set(expected))),
                        ('of another shape', sorted(k for k in expected.keys() & found.keys()
                                                    if expected[k] != found[k]))):
        if names:
            parts.append(f'{len(names)} {what} ({", ".join(names[:5])}{", ..." if len(names) > 5 else ""})')
    return '; '.join(parts)


def verify_export(folder: Union[str, Path]) -> Dict[str, Any]:
    """Check that an export folder is what `timm.create_model('local-dir:...' / 'hf-hub:...', pretrained=True)`
    can load, before it is published: config.json is strict JSON naming a registered architecture, and
    model.safetensors is complete, holds exactly the tensors (names and shapes) of the model config.json builds,
    and all of them finite. Returns the parsed config.json.

    Raises:
        FileNotFoundError: a file of the export is missing.
        ExportError: what is wrong, naming the file.
    """
    import safetensors.torch
    import timm
    import torch

    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} is not an export folder (missing {", ".join(missing)}): make one with '
                                '`timm-ic export` or timm_ic.hub.export first')
    config_path, weights_path = folder / 'config.json', folder / 'model.safetensors'
    try:
        config = json.loads(config_path.read_text(encoding='utf-8'), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f'{config_path} is not valid JSON ({e}): export again') from e
    architecture = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ExportError(f'{config_path} names architecture {architecture!r}, which timm does not know: nobody '
                          'could load the export; export again from a timm model')
    try:
        state_dict = safetensors.torch.load_file(str(weights_path), device='cpu')
    except Exception as e:  # SafetensorError, OSError
        raise ExportError(f'{weights_path} is not a readable safetensors file ({e}): truncated or corrupt; '
                          'export again') from e
    _check_finite(state_dict, str(weights_path))
    try:
        with torch.device('meta'):  # shapes only: nothing allocated
            model = create_model(f'local-dir:{folder.absolute()}')
    except Exception as e:
        raise ExportError(f'{config_path} does not build a model ({type(e).__name__}: {e}): export again') from e
    differences = _shape_differences({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                     {k: tuple(v.shape) for k, v in state_dict.items()})
    if differences:
        raise ExportError(f'{weights_path} does not fit the {architecture} that {config_path} describes: tensors '
                          f'{differences}. The files come from different exports: export again')
    return config


def _foreign_architecture_message(model: nn.Module, architecture: str, placement: Any) -> str:
    # timm_ic.rewrite keeps the source model's pretrained_cfg, so its architecture is timm's, which takes no
    # placement: config.json would say create_model(architecture, placement=...), which raises TypeError
    import timm
    num_classes = getattr(model, 'num_classes', None)
    candidate = next((f'{p}_{architecture}' for p in ('ic', 'kim', 'uout', 'cifar')
                      if timm.is_model(f'{p}_{architecture}')), None)
    rebuild = (f"timm.create_model('{candidate}', num_classes={num_classes}, placement='{placement}'), then "
               "load_state_dict() these weights into it (the tensor names match when it is the same network)"
               ) if candidate else (
        "a timm-ic architecture (timm.list_models(['ic_*', 'kim_*', 'uout_*', 'cifar_*'])) with this placement")
    return (f'the model has the timm-ic placement {str(placement)!r} but its architecture {architecture!r} is '
            f'not registered by timm-ic (a timm_ic.rewrite() result keeps its source\'s architecture), so '
            f"config.json's timm.create_model({architecture!r}, placement=...) could not load it back. Export a "
            f'model of a registered timm-ic architecture instead: {rebuild}; or export the source model before '
            'rewriting it')


def _check_tag_fits(tag: str, model: nn.Module, pretrained_cfg: Dict[str, Any], placement: Optional[str]) -> str:
    """Weights published as a registry tag are loaded into `timm.create_model('<arch>.<tag>')`: the tag's
    hub_cards cfg must describe them, and the architecture's default build must hold the same tensors.
    Returns the extra create_model kwargs the card's examples need (the placement, when not the default)."""
    arch, _, tag_name = tag.partition('.')
    tag_cfg = pretrained_cfgs(arch)[tag_name]
    def as_tuple(value: Any) -> Any:
        return tuple(value) if isinstance(value, (list, tuple)) else value
    for key in ('num_classes', 'input_size', 'mean', 'std'):
        if key in tag_cfg and as_tuple(tag_cfg[key]) != as_tuple(pretrained_cfg.get(key)):
            raise ValueError(f'{tag}: hub_cards gives {key}={tag_cfg[key]}, these weights have '
                             f'{pretrained_cfg.get(key)}; train with the tag\'s preprocessing (e.g. --mean/--std, see '
                             'the recipe), fix the tag\'s dataset or cfg in models.yaml, or publish under a repo id '
                             'without --tag (loaded with hf-hub:)')
    default = create_model(arch, num_classes=pretrained_cfg['num_classes'],
                           in_chans=pretrained_cfg['input_size'][0])
    expected = {k: tuple(v.shape) for k, v in default.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in model.state_dict().items()}:
        raise ValueError(f'{tag} loads {arch} with its default placement {getattr(default, "placement", None)}, '
                         f'whose tensors differ from these weights (placement {placement}); publish them under a '
                         'repo id without --tag: hf-hub: loading rebuilds their exact placement')
    default_placement = getattr(default, 'placement', None)
    if placement and default_placement is not None and str(default_placement) != placement:
        return f", placement='{placement}'"
    return ''


def export(
        model_or_run_dir: Union[nn.Module, str, Path],
        out_dir: Union[str, Path],
        *,
        repo_id: Optional[str] = None,
        tag: Optional[str] = None,
        label_names: Optional[Sequence[str]] = None,
        metrics: Optional[Dict[str, float]] = None,
        dataset: Any = None,
        recipe: Any = None,
        args: Optional[Dict[str, Any]] = None,
        license: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        description: Optional[str] = None,
        overwrite: bool = True,
) -> Path:
    """Write `model.safetensors`, `config.json` and `README.md` for `timm.create_model('hf-hub:...')`.

    Args:
        model_or_run_dir: a timm model (from `timm.create_model`) or a train.py run folder.
        out_dir: the export folder; replaced atomically if it is empty or holds an earlier export, else refused.
        repo_id: Hub repo the export is meant for (names the card and its usage examples).
        tag: a hub_cards `<arch>.<tag>` these weights are published as: fills dataset / recipe / license
            from models.yaml and makes the card's examples load by that registry name.
        label_names, metrics (percent: top1, top5), dataset, recipe, args, license: card data; for a run folder
            they default to its run.json. `metrics` are the only numbers that go into `model-index`.
        model_args: JSON kwargs that rebuild the model (added to those `timm.create_model` recorded; the
            model's placement is always written as its string form).
        data_config: input_size / mean / std / crop_pct / interpolation the weights were trained with.
    Returns:
        The export folder.
    Raises:
        RunRecordError: a run folder that cannot be exported (names the file).
        ExportError: weights holding NaN or inf (names the tensors).
        FileExistsError: `out_dir` exists and is not empty or an earlier export (or `overwrite=False`).
        ValueError: arguments that would make an export nobody can load (architecture, tag, label names).
    """
    model, run, state_dict = _model_and_run(model_or_run_dir)
    entry = card_entry(tag) if tag else None
    architecture = _check_architecture(model, run, tag, model_args)
    license = license or (entry or {}).get('license') or 'apache-2.0'
    pretrained_cfg = _export_pretrained_cfg(model, run, data_config, license)
    label_names = list(label_names or run.get('label_names') or []) or None
    if label_names is not None and len(label_names) != model.num_classes:
        raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes')
    metrics = metrics if metrics is not None else run.get('metrics')
    dataset_info = _dataset_info(dataset if dataset is not None else run.get('dataset'))
    if dataset_info is None and entry:
        dataset_info = entry['dataset']
    recipe = _public(recipe if recipe is not None else (run.get('recipe') or (entry or {}).get('recipe')))
    if isinstance(recipe, dict):
        recipe.pop('path', None)
    args = _public(args if args is not None else run.get('args'))
    args_for_config = _model_args(model, {**(run.get('model_args') or {}), **(model_args or {})})
    placement = args_for_config.get('placement')
    pretrained_cfg['paper_ids'] = tuple(f'arXiv:{p}' for p in papers_for(architecture, placement=placement))
    load_kwargs = _check_tag_fits(tag, model, pretrained_cfg, placement) if tag else ''
    stats = count_model_stats(model, pretrained_cfg['input_size'])
    card = _card(model, run, architecture, placement, pretrained_cfg, stats, dataset_info=dataset_info,
                 metrics=metrics, recipe=recipe, args=args, license=license, description=description,
                 repo_name=repo_id or tag or Path(out_dir).name,
                 load_name=tag or (f'hf-hub:{repo_id}' if repo_id else 'hf-hub:ORG/NAME'), load_kwargs=load_kwargs)
    config_text = _config_json(model, run, architecture, placement, args_for_config, pretrained_cfg, stats,
                               label_names=label_names, metrics=metrics, dataset_info=dataset_info, recipe=recipe,
                               tag=tag)

    def write(folder: Path) -> None:
        import safetensors.torch
        safetensors.torch.save_file(state_dict, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
        (folder / 'config.json').write_text(config_text, encoding='utf-8')
        (folder / 'README.md').write_text(card, encoding='utf-8')

    out_dir = Path(out_dir)
    _write_folder_atomically(out_dir, write, overwrite)
    return out_dir


def _model_and_run(model_or_run_dir: Union[nn.Module, str, Path]) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """(model, run record or {}, CPU state dict): a run folder's model rebuilt, its weights checked finite."""
    run = None
    if isinstance(model_or_run_dir, nn.Module):
        model = model_or_run_dir
    else:
        run = read_run(model_or_run_dir)
        model = model_from_run(run)
    # before anything is computed or written: a diverged run's weights must not be published
    state_dict = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    _check_finite(state_dict, f"{run['weights']}" if run else 'the model\'s weights')
    if not hasattr(model, 'pretrained_cfg') or not hasattr(model, 'num_classes'):
        raise TypeError(f'{type(model).__name__} is not a timm classification model (no pretrained_cfg / '
                        'num_classes); export the model timm.create_model returned, not a features_only wrapper')
    return model, run or {}, state_dict


def _check_architecture(model: nn.Module, run: Dict[str, Any], tag: Optional[str],
                        model_args: Optional[Dict[str, Any]]) -> str:
    """The registered architecture config.json names; ValueError when nobody could load the export by it."""
    import timm
    architecture = run.get('model') or model.pretrained_cfg.get('architecture')
    if not architecture or not timm.is_model(architecture):
        raise ValueError(f'architecture {architecture!r} is not registered in timm, so nobody could load the '
                         'export; create the model with timm.create_model')
    if tag and tag.split('.')[0] != architecture:
        raise ValueError(f'tag {tag!r} is for architecture {tag.split(".")[0]!r}, the model is {architecture!r}')
    placed = getattr(model, 'placement', None) or (model_args or {}).get('placement')
    if placed is not None and not takes_placement(architecture):
        raise ValueError(_foreign_architecture_message(model, architecture, placed))
    return architecture


def _export_pretrained_cfg(model: nn.Module, run: Dict[str, Any], data_config: Optional[Dict[str, Any]],
                           license: str) -> Dict[str, Any]:
    """config.json's pretrained_cfg: the model's own, without its source weights' fields, with the data config
    the weights were trained with, sizes and mean/std fitted to the model's input channels."""
    from timm.models import PretrainedCfg
    source_cfg = dict(model.pretrained_cfg)
    # only real PretrainedCfg fields (timm raises on others), no weight source
    cfg_fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    pretrained_cfg = {k: v for k, v in source_cfg.items()
                      if k in cfg_fields and k not in _SOURCE_KEYS | _SOURCE_WEIGHT_FIELDS and v is not None}
    run_data_cfg = run.get('data_config') or {}
    for key in _DATA_CFG_KEYS:
        for cfg in (run_data_cfg, data_config or {}):
            if cfg.get(key) is not None:
                pretrained_cfg[key] = cfg[key]
    in_chans = _in_chans(model, pretrained_cfg)
    input_size = tuple(pretrained_cfg.get('input_size') or (in_chans, 224, 224))
    pretrained_cfg['input_size'] = (in_chans, *input_size[1:])
    if input_size[1:] != tuple(source_cfg.get('input_size') or input_size)[1:]:
        # the final feature map follows the input size: the source cfg's pool size is wrong for these weights
        pretrained_cfg.pop('pool_size', None)
        pretrained_cfg.pop('test_pool_size', None)
    for key in ('test_input_size', 'min_input_size'):
        if pretrained_cfg.get(key):
            pretrained_cfg[key] = (in_chans, *tuple(pretrained_cfg[key])[1:])
    for key in ('mean', 'std'):
        values = tuple(pretrained_cfg.get(key) or ())
        if values and len(values) != in_chans:
            # e.g. an ImageNet RGB cfg on a 1-channel model: timm's transforms need one value per channel
            pretrained_cfg[key] = (round(sum(values) / len(values), 4),) * in_chans
    pretrained_cfg['num_classes'] = int(model.num_classes)
    pretrained_cfg['hf_hub_filename'] = 'model.safetensors'  # so the Hub path fetches only safetensors
    pretrained_cfg['custom_load'] = False
    pretrained_cfg.pop('label_names', None)
    pretrained_cfg.pop('label_offset', None)
    pretrained_cfg['license'] = license
    return pretrained_cfg


def _card(model: nn.Module, run: Dict[str, Any], architecture: str, placement: Optional[str],
          pretrained_cfg: Dict[str, Any], stats: Dict[str, float], **card_data: Any) -> str:
    """README.md of the export (hub/cards.py), from the run record and the card data `export` resolved."""
    metrics = card_data.pop('metrics')
    # a diverged epoch's NaN loss is no measurement: the card (and its model-index) leaves it out
    card_metrics = {k: v for k, v in metrics.items()
                    if not (isinstance(v, float) and not math.isfinite(v))} if metrics else metrics
    eval_split = ((run.get('dataset') or {}).get('val_split') if isinstance(run.get('dataset'), dict)
                  else None) or 'validation'
    placement_obj = getattr(model, 'placement', None)
    placement_words = placement_obj.describe() if hasattr(placement_obj, 'describe') else (
        f'`{placement}`' if placement else 'timm\'s own layout of this architecture (no timm-ic placement)')
    return render_card(
        architecture=architecture, placement=placement, placement_words=placement_words, stats=stats,
        input_size=pretrained_cfg['input_size'], num_classes=int(model.num_classes),
        feature_channels=_feature_channels(model), dataset=card_data.pop('dataset_info'), metrics=card_metrics,
        registered_by_timm_ic=takes_placement(architecture), versions=run.get('versions'),
        run_status=run.get('status'), eval_split=eval_split, **card_data,
    )


def _config_json(model: nn.Module, run: Dict[str, Any], architecture: str, placement: Optional[str],
                 args_for_config: Dict[str, Any], pretrained_cfg: Dict[str, Any], stats: Dict[str, float], *,
                 label_names: Optional[List[str]], metrics: Optional[Dict[str, Any]],
                 dataset_info: Optional[Dict[str, Any]], recipe: Any, tag: Optional[str]) -> str:
    """config.json's text: timm's layout, timm-ic's own record under `timm_ic`, strict JSON."""
    from .._versions import __version__ as timm_ic_version
    config = {
        'architecture': architecture,
        'num_classes': int(model.num_classes),
        'num_features': int(getattr(model, 'num_features', 0)) or None,
        'global_pool': getattr(model, 'global_pool', None) if isinstance(getattr(model, 'global_pool', None),
                                                                         str) else None,
        'label_names': label_names,
        'model_args': args_for_config,
        'pretrained_cfg': pretrained_cfg,  # made JSON (tuples as lists) below
        'timm_ic': {
            'version': timm_ic_version,
            'placement': placement,
            'metrics': metrics,
            'dataset': _public({k: v for k, v in dataset_info.items() if k != 'cfg'}) if dataset_info else None,
            'recipe': recipe,
            'tag': tag,
            'stats': {k: round(v, 6) for k, v in stats.items()},
            'versions': run.get('versions'),
            'run_status': run.get('status'),
        },
    }
    config = {k: v for k, v in config.items() if v is not None}
    # strict JSON: a NaN / inf the run recorded (a diverged epoch's loss, say) becomes null, and config.json
    # says which fields those were and why
    non_finite: List[str] = []
    config = finite_json(config, non_finite)
    if non_finite:
        config['timm_ic']['non_finite'] = {
            'fields': non_finite,
            'reason': 'NaN or infinite in the run record (a diverged epoch); written as null, since JSON has no NaN'}
    return json.dumps(config, indent=2, allow_nan=False) + '\n'
