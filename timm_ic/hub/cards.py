"""`hub_cards/`: the one source of pretrained tags, and the model cards rendered from it.

`hub_cards/models.yaml` lists each published (or planned) `<arch>.<recipe>_<dataset>` tag with its Hub repo
name, dataset, recipe and license; `hub_cards/template.md` is the card, rendered with
`huggingface_hub.ModelCard.from_template`. Set `TIMM_IC_HUB_CARDS` to another folder (or models.yaml file)
to use other card data, e.g. a team's own zoo or a test's.

The folder lives at the repository root and is installed as the data package `timm_ic.hub.hub_cards`
(pyproject.toml's package-dir), so wheels and editable installs both find it.
"""
import copy
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from ..placement import Placement

__all__ = [
    'HUB_CARDS_ENV', 'HUB_NAMESPACE_ENV', 'hub_cards_dir', 'load_hub_cards', 'hub_namespace',
    'pretrained_cfgs', 'add_pretrained_tags', 'pretrained_tags', 'hub_repo_id', 'card_entry', 'papers_for', 'count_model_stats',
    'render_card',
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
# where a wheel installs that package (beside this file), then the repository's folder (editable installs)
_DEFAULT_DIRS = (Path(__file__).resolve().parent / 'hub_cards', Path(__file__).resolve().parents[2] / 'hub_cards')


def hub_cards_dir() -> Path:
    """The hub_cards folder: `$TIMM_IC_HUB_CARDS` (a folder, or its models.yaml), else the installed one."""
    override = os.environ.get(HUB_CARDS_ENV)
    if override:
        path = Path(override).expanduser()
        return path.parent if path.suffix in ('.yaml', '.yml') else path
    return next((path for path in _DEFAULT_DIRS if (path / 'models.yaml').is_file()), _DEFAULT_DIRS[-1])


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
            f'timm-ic looks for the installed {_CARDS_PACKAGE} package, then the repository\'s hub_cards/; '
            f'reinstall timm-ic, or set ${HUB_CARDS_ENV} to a hub_cards folder')
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
    `timm_ic.hub.build_model_with_checks`). The namespace is read now: `$TIMM_IC_HUB_NAMESPACE` at import.

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
        placement: Optional[Union[str, 'Placement']] = None,
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


def _placement_keys(placement: Union[str, 'Placement']) -> Tuple[str, Optional[str]]:
    """(preset, drop kind in use inside blocks, or None) of a placement or its string form."""
    from ..placement import Placement
    try:
        parsed = Placement.parse(placement)
    except ValueError:  # a record written by another version: its preset name is still the prefix
        return str(placement).partition(':')[0], None
    # str() picks the preset needing the fewest overrides, so equal layouts cite alike however they were written
    return str(parsed).partition(':')[0], parsed.drop if parsed.has_drop else None


class _ActivationCounter(TorchDispatchMode):
    """Counts output elements of convolutions and matrix products: fvcore's activation count, which timm's
    own cards report as 'Activations (M)'."""
    _OPS = ('convolution', 'mm', 'addmm', 'bmm', 'baddbmm', 'matmul', 'linear', '_scaled_dot_product')

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if any(name.startswith(op) for op in self._OPS) and isinstance(out, torch.Tensor):
            self.count += out.numel()
        return out


@torch.no_grad()
def count_model_stats(model: torch.nn.Module, input_size: Sequence[int]) -> Dict[str, float]:
    """Params (M), GMACs and Activations (M) of one `input_size` (C, H, W) image, in eval mode.

    MACs are half of `torch.utils.flop_counter.FlopCounterMode`'s FLOPs (it counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros((1, *input_size), dtype=param.dtype, device=param.device)
        counter = FlopCounterMode(display=False)
        activations = _ActivationCounter()
        with counter, activations:
            model(x)
    finally:
        model.train(was_training)
    return {
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'gmacs': counter.get_total_flops() / 2 / 1e9,
        'activations_m': activations.count / 1e6,
    }


def _fmt(value: float) -> str:
    return f'{value:.3g}' if value < 1 else f'{value:.2f}'


def _recipe_text(recipe: Any, args: Optional[Dict[str, Any]]) -> str:
    lines = []
    if isinstance(recipe, dict):
        name = recipe.get('name')
        values = recipe.get('values') if isinstance(recipe.get('values'), dict) else {
            k: v for k, v in recipe.items() if k not in ('name', 'path')}
        lines.append(f'Recipe `{name}` of timm-ic\'s `train.py`, with these settings:' if name
                     else 'Settings of timm-ic\'s `train.py`:')
        lines.append('```yaml')
        lines.append(yaml.safe_dump(values, sort_keys=True, default_flow_style=None).rstrip())
        lines.append('```')
    elif recipe:
        lines.append(f'Recipe `{recipe}` of timm-ic\'s `train.py`.')
    else:
        lines.append('Not recorded: these weights were exported from a model, not from a `train.py` run.')
    if args:
        lines.append('\nEvery resolved option of the run (the recipe, then command-line flags over it):')
        lines.append('```yaml')
        lines.append(yaml.safe_dump(args, sort_keys=True, default_flow_style=None).rstrip())
        lines.append('```')
    return '\n'.join(lines)


def render_card(
        *,
        architecture: str,
        repo_name: str,
        placement: Optional[str],
        placement_words: str,
        stats: Dict[str, float],
        input_size: Tuple[int, int, int],
        num_classes: int,
        feature_channels: Optional[List[int]] = None,
        dataset: Optional[Dict[str, Any]] = None,
        metrics: Optional[Dict[str, float]] = None,
        eval_split: str = 'validation',
        recipe: Any = None,
        args: Optional[Dict[str, Any]] = None,
        license: str = 'apache-2.0',
        load_name: Optional[str] = None,
        description: Optional[str] = None,
        versions: Optional[Dict[str, str]] = None,
        registered_by_timm_ic: bool = True,
        run_status: Optional[str] = None,
        load_kwargs: str = '',
) -> str:
    """The model card (README.md text) of one export, from hub_cards/template.md.

    Only `metrics` (the run record's measured top-1/top-5, in percent) go into `model-index`; nothing
    else is a result."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cards = load_hub_cards()
    dataset = dataset or {}
    hub_dataset = dataset.get('hub_id')
    dataset_name = dataset.get('name') or 'unknown'
    tags = ['image-classification', 'timm', 'timm_ic']
    if placement:
        tags.append(f'placement-{placement.split(":")[0]}')
    eval_results = []
    for key, metric_type, metric_name in (('top1', 'accuracy', 'Top-1 accuracy'),
                                          ('top5', 'top_5_accuracy', 'Top-5 accuracy')):
        if metrics and metrics.get(key) is not None:
            eval_results.append(EvalResult(
                task_type='image-classification', task_name='Image Classification',
                dataset_type=hub_dataset or dataset.get('key') or dataset_name, dataset_name=dataset_name,
                dataset_split=eval_split, metric_type=metric_type, metric_name=metric_name,
                metric_value=round(float(metrics[key]), 3),
            ))
    card_data = ModelCardData(
        library_name='timm', pipeline_tag='image-classification', license=license, tags=tags,
        datasets=[hub_dataset] if hub_dataset else None, model_name=repo_name,
        eval_results=eval_results or None,
    )
    paper_ids = papers_for(architecture, cards, placement)
    if hub_dataset:
        dataset_text = f'{dataset_name} (https://huggingface.co/datasets/{hub_dataset})'
    elif dataset:
        dataset_text = f'{dataset_name}; not a Hub dataset' + (
            f', loaded with `{dataset["source"]}`' if dataset.get('source') else '')
    else:
        dataset_text = 'not recorded'
    metrics_text = ', '.join(f'{label} {metrics[k]:.2f}%' for k, label in (('top1', 'top-1'), ('top5', 'top-5'))
                             if metrics and metrics.get(k) is not None)
    if not metrics_text and metrics is not None:
        metrics_text = 'no accuracy recorded'
    description = (description or f'Image classifier `{architecture}`: timm-ic\'s placement of '
                   f'normalization and dropout, {num_classes} classes.')
    if run_status not in (None, 'finished'):
        description += f'\n\nThe training run had not finished when these weights were exported (status: {run_status}).'
    if versions:
        description = description + '\n\nTrained with ' + ', '.join(
            f'{k} {v}' for k, v in sorted(versions.items())) + '.'
    template = hub_cards_dir() / 'template.md'
    if not template.is_file():  # a custom TIMM_IC_HUB_CARDS folder may hold only models.yaml
        template = next((d / 'template.md' for d in _DEFAULT_DIRS if (d / 'template.md').is_file()), template)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_name,
        description=description.strip(),
        architecture=architecture,
        architecture_origin='timm-ic, registered into timm by `import timm_ic`' if registered_by_timm_ic
        else 'a timm architecture',
        params_m=_fmt(stats['params_m']),
        gmacs=_fmt(stats['gmacs']),
        activations_m=_fmt(stats['activations_m']),
        image_size=f'{input_size[1]} x {input_size[2]}, {input_size[0]} channel(s)',
        in_chans=input_size[0],
        placement=placement or 'none (not a timm-ic placed model)',
        placement_words=placement_words,
        papers=[f'{_paper_title(cards["papers"].get(p, ""))}: https://arxiv.org/abs/{p}' for p in paper_ids],
        dataset_text=dataset_text,
        metrics_text=metrics_text,
        eval_split=eval_split,
        load_name=load_name or f'hf-hub:{repo_name}',
        load_kwargs=load_kwargs,
        feature_channels=feature_channels or 'per stage',
        recipe_text=_recipe_text(recipe, args),
        citations=[cards['papers'][p] for p in paper_ids if p in cards['papers']],
    )
    return str(card)


def _paper_title(bibtex: str) -> str:
    for line in bibtex.splitlines():
        line = line.strip()
        if line.startswith('title='):
            return line[len('title='):].strip(',').strip('{}')
    return 'paper'
