"""The run record `run.json` that `train.py` writes into its output folder (schema in train.py's docstring)."""
import math
import os
import platform
from typing import Any, Dict, List, Optional

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


def to_jsonable(value: Any, non_finite: Optional[List[str]] = None, _where: str = '') -> Any:
    """Tuples to lists, paths and other objects to strings, NaN and infinities to None, so that the record is
    plain JSON (Python's json would write a bare `NaN`, which other readers reject). The dotted path of each
    non-finite value is appended to `non_finite` when given."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, non_finite, f'{_where}{k}.') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, non_finite, f'{_where}{i}.') for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        if non_finite is not None:
            non_finite.append(_where.rstrip('.'))
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json_atomic(path: os.PathLike, data: Dict[str, Any]) -> None:
    """Write `data` (made JSON-able) atomically, so readers never see half a file; NaN and infinities are
    written as null and listed under `non_finite`."""
    non_finite: List[str] = []
    data = to_jsonable(data, non_finite)
    if non_finite:
        data['non_finite'] = non_finite
    _write_json_atomic(path, data)
