"""The run record `run.json` that `train.py` writes into its output folder (schema in train.py's docstring)."""
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict

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
    """Write `data` as JSON via a temporary file and `os.replace`, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f'.tmp-{path.name}')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(to_jsonable(data), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
