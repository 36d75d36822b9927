"""The one atomic-write module everything writes through."""
import json
import os
import stat

import pytest
import torch

from timm_ic._atomic import atomic_file, publish_folder, save_safetensors_atomic, write_json_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'run.json'
    write_json_atomic(path, {'epoch': 1})
    with pytest.raises(RuntimeError, match='crash mid-write'):
        with atomic_file(path) as tmp:
            tmp.write_text('{"epo')
            raise RuntimeError('crash mid-write')
    assert path.read_text().strip() == '{\n "epoch": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ['run.json']


def test_written_files_get_usual_permissions(tmp_path):
    path = tmp_path / 'w.safetensors'
    save_safetensors_atomic({'w': torch.ones(2)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_publish_folder_replaces_the_old_folder_whole(tmp_path):
    final = tmp_path / 'export'
    final.mkdir()
    (final / 'old.txt').write_text('old')
    new = tmp_path / '.export.tmp'
    new.mkdir(mode=0o700)
    (new / 'config.json').write_text('{}')
    publish_folder(new, final)
    assert [p.name for p in final.iterdir()] == ['config.json']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export']
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask  # like any new folder, not mkdtemp's 0700


def _strict_json(text: str):
    """json.loads that rejects NaN / Infinity, as JSON readers other than Python's do."""
    def refuse(constant):
        raise ValueError(f'not JSON: {constant}')
    return json.loads(text, parse_constant=refuse)


def test_json_writer_turns_non_finite_numbers_into_null(tmp_path):
    from timm_ic._atomic import finite_json
    path = tmp_path / 'run.json'
    write_json_atomic(path, {'loss': float('nan'), 'rows': [{'lr': 0.1, 'grad': float('inf')}], 'ok': 1.5})
    assert _strict_json(path.read_text()) == {'loss': None, 'rows': [{'lr': 0.1, 'grad': None}], 'ok': 1.5}
    replaced = []
    assert finite_json({'a': (1.0, float('-inf'))}, replaced) == {'a': [1.0, None]} and replaced == ['a[1]']
