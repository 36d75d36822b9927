"""Fixtures shared by the test modules, the registered models, and the data writers more than one of them
needs (test modules do not import each other)."""
import gzip
import io
import json
import tarfile
from pathlib import Path

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (the redrawing dropout's) run in Triton's interpreter on CPU tensors: it must be asked for
    # before triton is first imported
    os.environ.setdefault('TRITON_INTERPRET', '1')
import timm
from PIL import Image

import timm_ic  # registers the models listed below
from timm_ic.training.data import MNIST_RAW_FILES

# the registered models, shared by test_models.py and test_fold.py
MODELS = timm.list_models(module=['ic_resnet', 'ic_densenet'])
# the deepest nets, whose forward/backward, intermediates or torchscript took over 10 s each on the loaded 2-core
# machine: `slow` for those tests (their shallower siblings run the same code in the quick loop)
DEEP = {'ic_resnet101', 'ic_resnet110', 'ic_resnet152', 'ic_resnet164', 'kim_preresnet110', 'cifar_resnet110',
        'cifar_resnet164', 'cifar_preresnet164', 'cifar_densenet_bc100', 'uout_densenet121', 'uout_densenet_bc100'}
IMAGENET = [m for m in MODELS if timm.get_pretrained_cfg(m).input_size[-1] > 32]


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    size = 64 if name in IMAGENET else 32
    return torch.randn(batch, 3, size, size)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: a second thread only adds synchronisation, and on a
    busy 2-core machine it contends with everything else (measured: train.py ~50x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def idx_bytes(kind: str, n: int, seed: int = 0, size: int = 28) -> bytes:
    """An IDX file as MNIST's: images (magic 2051, n x size x size uint8) or labels (magic 2049, n uint8).
    Image pixels encode the label (mean brightness grows with it), so a model can learn them."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    if kind == 'labels':
        return np.array([2049, n], '>i4').tobytes() + labels.tobytes()
    pixels = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8) + (labels * 20)[:, None, None]
    return np.array([2051, n, size, size], '>i4').tobytes() + pixels.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = False) -> Path:
    """The four MNIST-family IDX files in `folder` (gzipped with `.gz` names when `gz`, as Debian ships them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MNIST_RAW_FILES:
        n = n_train if name.startswith('train') else n_test
        data = idx_bytes('labels' if 'labels' in name else 'images', n, seed=len(name) + n)
        if gz:
            with gzip.open(folder / f'{name}.gz', 'wb') as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return folder


def _write_shards(root: Path, per_class: int = 8, num_shards: int = 1) -> Path:
    """WebDataset shards in timm's layout: `num_shards` .tar files per split, each with `per_class` images of
    each of 3 classes (`<key>.png` + `<key>.cls`), and `_info.json`."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    info = {'name': 'toy', 'splits': {}}
    for split in ('train', 'validation'):
        filenames = [f'toy-{split}-{k:04d}.tar' for k in range(num_shards)]
        for k, filename in enumerate(filenames):
            with tarfile.open(root / filename, 'w') as tar:
                for c in range(3):
                    for i in range(per_class):
                        pixels = rng.integers(0, 60, size=(12, 12, 3), dtype=np.uint8)
                        pixels[..., c] += 180
                        png = io.BytesIO()
                        Image.fromarray(pixels, 'RGB').save(png, 'PNG')
                        for ext, data in (('png', png.getvalue()), ('cls', str(c).encode())):
                            member = tarfile.TarInfo(f'{split}_{k}_{c}_{i}.{ext}')
                            member.size = len(data)
                            tar.addfile(member, io.BytesIO(data))
        n = 3 * per_class
        info['splits'][split] = {'name': split, 'num_samples': n * num_shards, 'filenames': filenames,
                                 'shard_lengths': [n] * num_shards}
    (root / '_info.json').write_text(json.dumps(info))
    return root



@pytest.fixture
def write_idx_set():
    """`write_idx_set(folder, n_train=40, n_test=20, gz=False)`: MNIST-family IDX files in `folder`."""
    return _write_idx_set


@pytest.fixture
def write_shards():
    """`write_shards(root, per_class=8, num_shards=1)`: WebDataset shards of 3 classes in timm's layout."""
    return _write_shards
