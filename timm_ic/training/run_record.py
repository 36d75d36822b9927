"""The run record `run.json` that `train.py` writes into its output folder (schema in train.py's docstring)."""
import os
import platform
from typing import Any, Dict

from .._atomic import write_json_atomic as _write_json_atomic

RUN_RECORD_SCHEMA = 'timm_ic.run_record/1'


def library_versions() -> Dict[str, str]:
    """Versions of the libraries a trained result depends on."""
    import accelerate
    import timm
    import torch

    import timm_ic
    return {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'accelerate': accelerate.__version__,
        'timm_ic': timm_ic.__version__,
    }


def to_jsonable(value: Any) -> Any:
    """Tuples to lists, paths and other objects to strings, so that the record is plain JSON."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json_atomic(path: os.PathLike, data: Dict[str, Any]) -> None:
    """Write `data` (made JSON-able) atomically, so readers never see half a file."""
    _write_json_atomic(path, to_jsonable(data))
