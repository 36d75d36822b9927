"""The run record `run.json` that train.py writes into its output folder, as one type: `RunRecord`.

train.py writes it (`RunRecord.write`, atomically, after every epoch); the Hub export (`timm_ic.hub.read_run`)
and `timm-ic diagnose` read it (`RunRecord.read`), which refuses a file it does not understand (not JSON, another
schema, unknown fields, a field of the wrong type) with a message naming the file and the problem. It lives
below training, hub and diagnostics, which all use it, and imports nothing of theirs.
"""
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ._atomic import finite_json, write_json_atomic
from ._versions import library_versions

__all__ = ['RUN_RECORD_SCHEMA', 'RunRecord', 'RunRecordError']

RUN_RECORD_SCHEMA = 'timm_ic.run_record/1'


class RunRecordError(ValueError):
    """A run.json that cannot be used: names the file and what is wrong."""


@dataclass
class RunRecord:
    """run.json, schema `timm_ic.run_record/1`; the Hub export turns it plus best.safetensors into a card.

    Fields (written in this order; `stop_reason` and `non_finite` only when set):
        schema, status            "running" | "finished" | "stopped: non-finite loss" | "stopped: non-finite weights"
        stop_reason               after a stop: what became non-finite, where
        model                     timm model name given to timm.create_model
        placement                 str(model.placement) for timm-ic models, else null
        model_args                kwargs for timm.create_model besides the name (num_classes, in_chans, placement, ...)
        num_classes, in_chans, label_names (index order, or null)
        pretrained_cfg            the model's pretrained_cfg (dict)
        data_config               resolved input_size, interpolation, mean, std, crop_pct, crop_mode
        dataset                   {key ('digits' or null), name, data_dir, hub_id (hfds), train_split, val_split,
                                   train_samples, val_samples}
        recipe                    {name, path, values} or null; values include notes such as `_source`, `_unknown`
        args                      every resolved option of train.py
        versions                  {python, torch, timm, accelerate, timm_ic}
        distributed               {world_size, distributed_type, mixed_precision, device,
                                   train_samples_per_rank (list, summed over this run's epochs)}
        weights                   {best, last} file names, ema (bool)
        epochs                    list of {epoch (1-based), train_loss, lr, eval_loss, eval_top1, eval_top5
                                   (percent), eval_samples, train_img_per_s, epoch_time_s, train_samples_per_rank}
        metrics                   {epoch, top1, top5, loss} of the best top-1 epoch (= best.safetensors), or null
        started_at, updated_at    UTC ISO times (started_at: of the run's first start, kept across resumes)
        resumes                   list of {checkpoint, num_updates, changed: {option: [before, after]}}: resumes
                                  that changed --lr or --clip-grad (e.g. after a divergence)
        skipped_images            unreadable-image reads skipped with --bad-images skip
        non_finite                dotted paths of values that were NaN or infinite, written as null (JSON has no NaN)
    """
    model: str
    schema: str = RUN_RECORD_SCHEMA
    status: str = 'running'
    stop_reason: Optional[str] = None
    placement: Optional[str] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    label_names: Optional[List[str]] = None
    pretrained_cfg: Dict[str, Any] = field(default_factory=dict)
    data_config: Dict[str, Any] = field(default_factory=dict)
    dataset: Optional[Dict[str, Any]] = None
    recipe: Optional[Dict[str, Any]] = None
    args: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    distributed: Dict[str, Any] = field(default_factory=dict)
    weights: Dict[str, Any] = field(default_factory=dict)
    epochs: List[Dict[str, Any]] = field(default_factory=list)
    metrics: Optional[Dict[str, Any]] = None
    started_at: Optional[str] = None
    updated_at: Optional[str] = None
    resumes: List[Dict[str, Any]] = field(default_factory=list)
    skipped_images: int = 0
    non_finite: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        """The record as plain JSON: NaN and infinities as null, their dotted paths under `non_finite`."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data = {'schema': data.pop('schema'), 'status': data.pop('status'), **data}
        for optional in ('stop_reason', 'non_finite'):
            if not data[optional]:
                del data[optional]
        replaced: List[str] = []
        data = finite_json(data, replaced)
        if replaced:  # run.json's paths are dotted throughout: epochs.0.eval_loss
            data['non_finite'] = [re.sub(r'\[(\d+)\]', r'.\1', p) for p in replaced]
        return data

    def write(self, path: Union[str, os.PathLike]) -> None:
        """Write run.json atomically: a reader never sees half a file."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: Any, where: str = 'run record') -> 'RunRecord':
        """A record from parsed JSON; `RunRecordError` (naming `where`) for anything this version does not read."""
        if not isinstance(data, dict):
            raise RunRecordError(f'{where} must hold a JSON object, got {type(data).__name__}')
        schema = data.get('schema')
        if schema != RUN_RECORD_SCHEMA:
            found = f'schema {schema!r}' if schema is not None else 'no "schema" field'
            raise RunRecordError(f'{where} has {found}; this timm-ic reads {RUN_RECORD_SCHEMA!r} (what its train.py '
                                 'writes): a record of another version needs that version of timm-ic')
        if not isinstance(data.get('model'), str) or not data['model']:
            raise RunRecordError(f'{where} has no model name (field "model")')
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RunRecordError(f'{where} has fields {RUN_RECORD_SCHEMA} does not define: {", ".join(unknown)}')
        for name, value in data.items():
            expected = _JSON_TYPES[name]
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                kinds = ' or '.join('null' if t is type(None) else _JSON_NAMES[t] for t in expected)
                raise RunRecordError(f'{where}: field "{name}" must be {kinds}, got {type(value).__name__} '
                                     f'{value!r:.60}')
        return cls(**data)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> 'RunRecord':
        """run.json at `path`; `RunRecordError` naming the file if it is not one this version understands."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding='utf-8'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunRecordError(f'{path} is not valid JSON ({e}); was the run interrupted while writing it?') from e
        return cls.from_json(data, str(path))


_JSON_NAMES = {str: 'a string', int: 'an integer', dict: 'an object', list: 'a list', float: 'a number'}
# what each field may hold in JSON (null where train.py may write it)
_JSON_TYPES = {
    'model': (str,), 'schema': (str,), 'status': (str,), 'stop_reason': (str, type(None)),
    'placement': (str, type(None)), 'model_args': (dict,), 'num_classes': (int, type(None)),
    'in_chans': (int, type(None)), 'label_names': (list, type(None)), 'pretrained_cfg': (dict,),
    'data_config': (dict,), 'dataset': (dict, type(None)), 'recipe': (dict, type(None)), 'args': (dict,),
    'versions': (dict,), 'distributed': (dict,), 'weights': (dict,), 'epochs': (list,), 'metrics': (dict, type(None)),
    'started_at': (str, type(None)), 'updated_at': (str, type(None)), 'resumes': (list,), 'skipped_images': (int,),
    'non_finite': (list,),
}


