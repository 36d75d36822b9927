"""The pretrained-tag registry: `hub_cards/models.yaml`, the one source of timm-ic's pretrained tags.

`hub_cards/models.yaml` lists each published (or planned) `<arch>.<recipe>_<dataset>` tag with its Hub repo
name, dataset, recipe and license; the model files add its tags to their cfgs (`add_pretrained_tags`) and
the Hub export (timm_ic.hub) renders cards from the same entries. Set `TIMM_IC_HUB_CARDS` to another folder
(or models.yaml file) to use other card data, e.g. a team's own zoo or a test's.

The folder lives at the repository root and is installed as the data package `timm_ic.hub.hub_cards`
(pyproject.toml's package-dir). The package finds it one way, at `timm_ic/hub/hub_cards` (`HUB_CARDS_DIR`):
in a wheel that is the installed folder; in a checkout (editable installs too) a symbolic link to the root's.
"""
import copy
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from ..placement import Placement

__all__ = [
    'HUB_CARDS_ENV', 'HUB_NAMESPACE_ENV', 'HUB_CARDS_DIR', 'hub_cards_dir', 'load_hub_cards', 'hub_namespace',
    'pretrained_cfgs', 'add_pretrained_tags', 'pretrained_tags', 'hub_repo_id', 'card_entry', 'papers_for',
]

HUB_CARDS_ENV = 'TIMM_IC_HUB_CARDS'
HUB_NAMESPACE_ENV = 'TIMM_IC_HUB_NAMESPACE'
# pretrained cfg fields a tag may set (a subset of timm's PretrainedCfg; anything else is a typo)
_CFG_FIELDS = frozenset({
    'num_classes', 'input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation',
    'crop_pct', 'test_crop_pct', 'crop_mode', 'mean', 'std', 'pool_size', 'test_pool_size', 'first_conv',
    'classifier', 'label_names', 'description', 'notes',
})
_ENTRY_FIELDS = frozenset({'hf_hub_id', 'published', 'dataset', 'recipe', 'license', 'cfg', 'description'})
_SAFE_WEIGHTS_NAME = 'model.safetensors'
_CARDS_PACKAGE = 'timm_ic.hub.hub_cards'
# the data package's folder: installed there by a wheel, a link to the repository's hub_cards/ in a checkout
HUB_CARDS_DIR = Path(__file__).resolve().parents[1] / 'hub' / 'hub_cards'


def hub_cards_dir() -> Path:
    """The hub_cards folder: `$TIMM_IC_HUB_CARDS` (a folder, or its models.yaml), else the installed one."""
    override = os.environ.get(HUB_CARDS_ENV)
    if override:
        path = Path(override).expanduser()
        return path.parent if path.suffix in ('.yaml', '.yml') else path
    return HUB_CARDS_DIR


def _models_yaml() -> Path:
    override = os.environ.get(HUB_CARDS_ENV)
    if override and Path(override).suffix in ('.yaml', '.yml'):
        return Path(override).expanduser()
    return hub_cards_dir() / 'models.yaml'


def load_hub_cards() -> Dict[str, Any]:
    """Parsed and checked `models.yaml` (a copy; cached until the file changes)."""
    path = _models_yaml()
    try:
        stat = path.stat()
    except FileNotFoundError:
        hint = f'${HUB_CARDS_ENV} points to it' if os.environ.get(HUB_CARDS_ENV) else (
            f'it is the installed {_CARDS_PACKAGE} package (in a checkout, a link to the repository\'s '
            f'hub_cards/); reinstall timm-ic, or set ${HUB_CARDS_ENV} to a hub_cards folder')
        raise FileNotFoundError(f'hub cards file {path} not found: {hint}') from None
    return copy.deepcopy(_load_hub_cards(str(path), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=8)
def _load_hub_cards(path: str, mtime_ns: int, size: int) -> Dict[str, Any]:
    with open(path, encoding='utf-8') as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f'{path} is not valid YAML: {e}') from None
    problems = []
    datasets = data.setdefault('datasets', {})
    data.setdefault('papers', {})
    data.setdefault('arch_papers', [])
    data.setdefault('placement_papers', [])
    models = data.setdefault('models', {}) or {}
    if not data.get('default_namespace'):
        problems.append('default_namespace is missing')
    for name, entry in models.items():
        arch, _, tag = name.partition('.')
        if not arch or not tag:
            problems.append(f'{name!r}: keys must be <arch>.<tag>')
            continue
        if not isinstance(entry, dict):
            problems.append(f'{name}: expected a mapping of card fields')
            continue
        unknown = set(entry) - _ENTRY_FIELDS
        if unknown:
            problems.append(f'{name}: unknown fields {sorted(unknown)}; valid: {sorted(_ENTRY_FIELDS)}')
        if entry.get('dataset') not in datasets:
            problems.append(f'{name}: dataset {entry.get("dataset")!r} is not one of {sorted(datasets)}')
        if not entry.get('hf_hub_id') or '/' in str(entry.get('hf_hub_id')):
            problems.append(f'{name}: hf_hub_id must be a repo name relative to the namespace (no "/")')
        bad_cfg = set(entry.get('cfg') or {}) - _CFG_FIELDS
        if bad_cfg:
            problems.append(f'{name}: cfg fields {sorted(bad_cfg)} are not pretrained cfg fields')
    for rule in data['placement_papers']:
        if not isinstance(rule, dict) or len({'preset', 'drop'} & set(rule)) != 1 or not rule.get('papers'):
            problems.append(f'placement_papers rule {rule!r}: give one of preset / drop, and papers')
    for rule in data['arch_papers'] + data['placement_papers']:
        missing = [p for p in (rule.get('papers') or []) if p not in data['papers']] if isinstance(rule, dict) else []
        if missing:
            problems.append(f'papers {missing} are cited by a rule but have no BibTeX under `papers`')
    for key, ds in datasets.items():
        bad_cfg = set(ds.get('cfg') or {}) - _CFG_FIELDS
        if bad_cfg:
            problems.append(f'dataset {key}: cfg fields {sorted(bad_cfg)} are not pretrained cfg fields')
    if problems:
        raise ValueError(f'{path} has problems:\n  ' + '\n  '.join(problems))
    return data


def hub_namespace() -> str:
    """The Hub namespace of pretrained tags: `$TIMM_IC_HUB_NAMESPACE`, else models.yaml's default."""
    return os.environ.get(HUB_NAMESPACE_ENV) or load_hub_cards()['default_namespace']


def _to_tuples(cfg: Dict[str, Any]) -> Dict[str, Any]:
    # timm's cfgs hold tuples (input_size, mean, std ...); YAML gives lists
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def pretrained_cfgs(arch: str) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs of `arch`'s tags, `{tag: cfg}`, for `timm.models.generate_default_cfgs`.

    A tag's cfg has its dataset's input/normalization/num_classes fields, its license and, when its weights
    can be downloaded, `hf_hub_id` (`<namespace>/<name>`) and `hf_hub_filename='model.safetensors'` (only
    safetensors are fetched). Without weights it has no hub id: `pretrained=True` then fails (see
    `timm_ic.models.build_model_with_checks`). The namespace is read now: `$TIMM_IC_HUB_NAMESPACE` at import.

    Use in a model file: `generate_default_cfgs({'arch.untrained': _cfg(),
    **{f'arch.{tag}': _cfg(**cfg) for tag, cfg in pretrained_cfgs('arch').items()}})`.
    """
    if not os.environ.get(HUB_CARDS_ENV) and not _models_yaml().is_file():
        # an installation without hub_cards/ still imports; it just has no pretrained tags
        warnings.warn(f'{_models_yaml()} not found: timm-ic models have no pretrained tags. Set {HUB_CARDS_ENV} '
                      'to a hub_cards folder, or reinstall timm-ic (its wheel ships hub_cards/)')
        return {}
    cards = load_hub_cards()
    custom_namespace = os.environ.get(HUB_NAMESPACE_ENV)
    namespace = custom_namespace or cards['default_namespace']
    out = {}
    for name, entry in cards['models'].items():
        entry_arch, _, tag = name.partition('.')
        if entry_arch != arch:
            continue
        dataset = cards['datasets'][entry['dataset']]
        cfg = _to_tuples({**(dataset.get('cfg') or {}), **(entry.get('cfg') or {})})
        if entry.get('license'):
            cfg['license'] = entry['license']
        cfg['paper_ids'] = tuple(f'arXiv:{p}' for p in papers_for(arch, cards))
        if entry.get('published') or custom_namespace:
            cfg['hf_hub_id'] = f"{namespace}/{entry['hf_hub_id']}"
            cfg['hf_hub_filename'] = _SAFE_WEIGHTS_NAME
        out[tag] = cfg
    return out


def add_pretrained_tags(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """A model file's `{'arch.tag': cfg}` plus every hub_cards tag of each of its architectures.

    A tag's cfg is its architecture's first cfg (first_conv, classifier, pool_size ...) updated with
    `pretrained_cfgs(arch)[tag]`. Use: `default_cfgs = generate_default_cfgs(add_pretrained_tags({...}))`."""
    out = dict(cfgs)
    base: Dict[str, Dict[str, Any]] = {}
    for name, cfg in cfgs.items():
        base.setdefault(name.split('.')[0], dict(cfg))
    for arch, arch_cfg in base.items():
        for tag, tag_cfg in pretrained_cfgs(arch).items():
            name = f'{arch}.{tag}'
            if name in out:
                raise ValueError(f'{name} is both a model file cfg and a hub_cards tag: keep it in hub_cards only')
            cfg = {**arch_cfg, **tag_cfg}
            base_size, base_pool = arch_cfg.get('input_size'), arch_cfg.get('pool_size')
            if 'pool_size' not in tag_cfg and base_size and base_pool and len(base_pool) == 2:
                # the final feature map scales with the input: (8, 8) at 32x32 is (4, 4) at 16x16
                cfg['pool_size'] = tuple(max(1, p * t // b) for p, t, b in
                                         zip(base_pool, cfg['input_size'][1:], base_size[1:]))
            out[name] = cfg
    return out


def pretrained_tags(published_only: bool = False) -> List[str]:
    """All `<arch>.<tag>` names in models.yaml (only those with weights under the namespace, if asked)."""
    cards = load_hub_cards()
    custom = bool(os.environ.get(HUB_NAMESPACE_ENV))
    return [n for n, e in cards['models'].items() if not published_only or custom or e.get('published')]


def card_entry(name: str) -> Dict[str, Any]:
    """models.yaml's entry for `<arch>.<tag>`, with its dataset expanded; KeyError naming the valid tags."""
    cards = load_hub_cards()
    if name not in cards['models']:
        raise KeyError(f'{name!r} is not in {_models_yaml()}; listed tags: {sorted(cards["models"])}')
    entry = dict(cards['models'][name])
    entry['dataset'] = {'key': entry['dataset'], **cards['datasets'][entry['dataset']]}
    return entry


def hub_repo_id(name: str) -> str:
    """Full Hub repo id of a registry tag `<arch>.<tag>` under the current namespace (where to push it)."""
    return f"{hub_namespace()}/{card_entry(name)['hf_hub_id']}"


def papers_for(
        arch: str,
        cards: Optional[Dict[str, Any]] = None,
        placement: Optional[Union[str, Placement]] = None,
) -> List[str]:
    """arXiv ids cited for an architecture and its placement, in rule order: models.yaml's `arch_papers`
    rules, then its `placement_papers` rules (the preset `str(placement)` is written from, the drop kind).

    The placement matters beside the architecture: `timm.create_model('cifar_resnet20', placement='kim')` or
    a `timm_ic.rewrite(...)` model carries Kim et al.'s layout under an architecture name that does not say so."""
    cards = cards or load_hub_cards()
    ids: List[str] = []
    for rule in cards['arch_papers']:
        hit = arch.startswith(rule['prefix']) if 'prefix' in rule else rule.get('contains', '\0') in arch
        if hit:
            ids += [p for p in rule['papers'] if p not in ids]
    if placement is not None:
        preset, drop = _placement_keys(placement)
        for rule in cards.get('placement_papers') or []:
            if ('preset' in rule and rule['preset'] == preset) or ('drop' in rule and rule['drop'] == drop):
                ids += [p for p in rule['papers'] if p not in ids]
    return ids


def _placement_keys(placement: Union[str, Placement]) -> Tuple[str, Optional[str]]:
    """(preset, drop kind in use inside blocks, or None) of a placement or its string form."""
    try:
        parsed = Placement.parse(placement)
    except ValueError:  # a record written by another version: its preset name is still the prefix
        return str(placement).partition(':')[0], None
    # str() picks the preset needing the fewest overrides, so equal layouts cite alike however they were written
    return str(parsed).partition(':')[0], parsed.drop if parsed.has_drop else None
