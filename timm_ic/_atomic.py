"""Atomic writes: a reader (or a crash) sees the old file or folder or the new one, never half of either.

Everything timm-ic writes goes through here: run records, weights, checkpoints, Hub exports, reports
and figures. New files get the usual permissions (0666 less the umask), not a temporary file's private mode.
"""
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

__all__ = ['atomic_file', 'publish_folder', 'finite_json', 'write_json_atomic', 'save_safetensors_atomic']


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(tmp: os.PathLike, final: os.PathLike) -> None:
    """Rename the finished folder `tmp` to `final`, replacing an older `final` without a moment of absence
    of both; its files are flushed to disk first."""
    tmp, final = Path(tmp), Path(final)
    mask = _umask()
    for path in tmp.rglob('*'):
        if path.is_file():
            _fsync(path)
            os.chmod(path, 0o666 & ~mask)  # safetensors and mkstemp leave private files
    os.chmod(tmp, 0o777 & ~mask)
    if final.exists():
        stale = Path(tempfile.mkdtemp(prefix=f'.{final.name}.', suffix='.old', dir=final.parent))
        os.replace(final, stale / final.name)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


def finite_json(value: Any, replaced: Optional[List[str]] = None, _where: str = '') -> Any:
    """`value` as plain JSON: every NaN / infinite float as None (JSON has no NaN: Python's json writes a bare
    `NaN` that other readers reject), tuples as lists, keys and values JSON has no type for (paths, dtypes) as
    strings. The path of each replaced float (`a.b[1]`) is appended to `replaced`, so a writer can say which
    fields were not finite."""
    if isinstance(value, float) and not math.isfinite(value):
        if replaced is not None:
            replaced.append(_where or '<root>')
        return None
    if isinstance(value, dict):
        return {str(k): finite_json(v, replaced, f'{_where}.{k}' if _where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, replaced, f'{_where}[{i}]') for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json_atomic(path: os.PathLike, data: Any, indent: int = 1) -> None:
    """`data` as strict JSON at `path`, atomically; non-finite floats become null (see `finite_json`)."""
    text = json.dumps(finite_json(data), indent=indent, allow_nan=False)
    with atomic_file(path) as tmp:
        tmp.write_text(text + '\n', encoding='utf-8')


def save_safetensors_atomic(tensors: Dict[str, Any], path: os.PathLike,
                            metadata: Optional[Dict[str, str]] = None) -> None:
    """A state dict as safetensors at `path`, atomically (contiguous CPU copies: safetensors refuses shared
    or strided storage)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
