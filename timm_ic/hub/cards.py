"""Model cards: README.md of an export, rendered from `hub_cards/template.md` with `huggingface_hub.ModelCard`.

The card data (datasets, papers, tags) comes from the pretrained-tag registry, `timm_ic.models.tags`;
the statistics from `timm_ic.hub.stats`.
"""
from typing import Any, Dict, List, Optional, Tuple

import yaml

from ..models.tags import HUB_CARDS_DIR, hub_cards_dir, load_hub_cards, papers_for

__all__ = ['render_card']


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
        template = HUB_CARDS_DIR / 'template.md'
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
