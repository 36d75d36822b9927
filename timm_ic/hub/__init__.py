"""Hugging Face Hub integration: export (safetensors + config.json + model card), push, pretrained loading.

    export(model_or_run_dir, out_dir)       folder timm loads with 'hf-hub:' / 'local-dir:'
    verify_export(folder)                   the export loads: complete, finite safetensors of config.json's model
    push(folder, repo_id)                   one commit to the Hub; clear errors, local folder untouched
    push_run(run_dir, repo_id)              export a train.py run to run_dir/hub_export, then push it
    render_card(...), count_model_stats(...) the model card and its statistics

The pretrained-tag registry (hub_cards/models.yaml) and model construction with clear pretrained errors live
below, in `timm_ic.models` (tags, pretrained, factory: `create_model`, the one way to build a model from a
name, a placement and weights); their names are re-exported here for convenience.
"""
from ..models.factory import create_model
from ..models.pretrained import PretrainedWeightsError, build_model_with_checks
from ..models.tags import (HUB_CARDS_ENV, HUB_NAMESPACE_ENV, add_pretrained_tags, hub_cards_dir, hub_namespace,
                           hub_repo_id, load_hub_cards, pretrained_cfgs, pretrained_tags)
from .cards import render_card
from .export import ExportError, RunRecordError, export, model_from_run, read_run, verify_export
from .push import HubPushError, push, push_run
from .stats import count_model_stats

__all__ = [
    'export', 'push', 'push_run', 'read_run', 'model_from_run', 'pretrained_cfgs', 'add_pretrained_tags', 'pretrained_tags',
    'hub_namespace', 'hub_repo_id', 'hub_cards_dir', 'load_hub_cards', 'render_card', 'count_model_stats',
    'build_model_with_checks', 'create_model', 'verify_export', 'ExportError', 'HubPushError', 'PretrainedWeightsError',
    'RunRecordError',
    'HUB_CARDS_ENV', 'HUB_NAMESPACE_ENV',
]
