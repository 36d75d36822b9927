"""Data sets shared by training and the diagnostics, below both: the embedded digits and torchvision's sets.

The embedded default: scikit-learn's bundled handwritten digits (real data, offline), 1,797 grey 8x8 images
of the digits 0-9, with their pixel statistics (`DIGITS_MEAN`, `DIGITS_STD`; the digits_demo recipe trains
with them). They are served as PIL images, like any `timm.data` image dataset, so the model's own transforms
(`resolve_data_config` + `create_transform`) apply unchanged.

`--dataset torch/NAME` (torchvision's `fashion_mnist`, `mnist`, `kmnist`, `cifar10`, `cifar100`), as timm's own
train.py takes them: the files torchvision reads under a data folder, or a download. Fashion-MNIST also comes
from the Debian package `dataset-fashion-mnist` when installed (see `fashion_mnist_root`).
"""
import gzip
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch.utils.data
from PIL import Image
from timm.data import create_dataset

from ._atomic import atomic_file

_logger = logging.getLogger(__name__)

DIGITS_CLASSES = tuple(str(i) for i in range(10))
# the digits' pixel statistics (grey, 0-1) at 16x16, the size the CIFAR ResNets' two stride-2 stages need
DIGITS_MEAN, DIGITS_STD, DIGITS_INPUT_SIZE = (0.3053,), (0.3759,), (1, 16, 16)
# Fashion-MNIST's training images' statistics, at their native 28x28
FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_INPUT_SIZE = (0.2860,), (0.3530,), (1, 28, 28)

_TRAIN_SPLIT_NAMES = ('train', 'training')
_VAL_SPLIT_NAMES = ('val', 'validation', 'valid', 'eval', 'evaluation')


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's `load_digits` as an image dataset with a fixed, stratified train/val split."""

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None, val_fraction: float = 0.2):
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # the extra carries it; say which
            raise ImportError("the embedded digits data needs scikit-learn: pip install 'timm-ic[demo]'") from e
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        targets = digits.target.astype(np.int64)
        # every 1/val_fraction-th sample of each class goes to val: deterministic and stratified
        is_val = np.zeros(len(targets), dtype=bool)
        step = round(1 / val_fraction)
        for c in range(10):
            idx = np.flatnonzero(targets == c)
            is_val[idx[::step]] = True
        keep = is_val if split == 'val' else ~is_val
        self.images, self.targets = images[keep], targets[keep]
        self.transform = transform
        self.classes = DIGITS_CLASSES

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index], mode='L')
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


# torchvision data sets timm's create_dataset knows by `torch/<name>`: the folder torchvision reads under the root
TORCH_DATASETS = {'fashion_mnist': 'FashionMNIST', 'mnist': 'MNIST', 'kmnist': 'KMNIST',
                  'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
_GREY_TORCH_DATASETS = ('fashion_mnist', 'mnist', 'kmnist')
# data set keys of hub_cards/models.yaml (`datasets:`), so cards and tags name the data a run used
_CARD_KEYS = {'digits': 'digits', 'torch/fashion_mnist': 'fmnist', 'torch/cifar10': 'c10', 'torch/cifar100': 'c100'}
# where Debian's `dataset-fashion-mnist` puts the four gzipped IDX files (recompressed: torchvision's md5 check
# rejects the .gz files, but their contents are exactly the files it reads)
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_DEBIAN_ENV = 'TIMM_IC_FASHION_MNIST_DEBIAN_DIR'
DATA_CACHE_ENV = 'TIMM_IC_DATA_CACHE'
MNIST_RAW_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                   't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


class DataError(ValueError):
    """The data given to `train.py` cannot be used; the message names the problem and the fix."""


def data_cache_dir() -> Path:
    """Where timm-ic keeps data it prepares itself: `$TIMM_IC_DATA_CACHE`, else `$XDG_CACHE_HOME/timm_ic/data`."""
    if os.environ.get(DATA_CACHE_ENV):
        return Path(os.environ[DATA_CACHE_ENV])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'timm_ic' / 'data'


def _has_mnist_raw(root: Optional[str], folder: str) -> bool:
    return bool(root) and all(os.path.isfile(os.path.join(root, folder, 'raw', f)) for f in MNIST_RAW_FILES)


def fashion_mnist_root(data_dir: Optional[str] = None, download: bool = False) -> str:
    """The root folder torchvision's `FashionMNIST` reads (`ROOT/FashionMNIST/raw/`), first that works of:

    `data_dir` when it holds the raw files; `data_dir` (or the cache folder) to download into with `download`;
    the Debian package's files (`$TIMM_IC_FASHION_MNIST_DEBIAN_DIR`, default `/usr/share/datasets/fashion-mnist`),
    un-gzipped once into `data_cache_dir()/FashionMNIST/raw/`, each file written atomically. Else `DataError`
    naming both ways to get the data.
    """
    if _has_mnist_raw(data_dir, 'FashionMNIST'):
        return data_dir
    if download:
        return data_dir or os.fspath(data_cache_dir())
    debian = Path(os.environ.get(FASHION_MNIST_DEBIAN_ENV) or FASHION_MNIST_DEBIAN_DIR)
    cache = data_cache_dir()
    if _has_mnist_raw(os.fspath(cache), 'FashionMNIST'):
        return os.fspath(cache)
    sources = [debian / f'{name}.gz' for name in MNIST_RAW_FILES]
    if all(p.is_file() for p in sources):
        raw = cache / 'FashionMNIST' / 'raw'
        for source, name in zip(sources, MNIST_RAW_FILES):
            if (raw / name).is_file():
                continue
            _logger.info(f'un-gzipping {source} into {raw}')
            try:
                with atomic_file(raw / name) as tmp, gzip.open(source, 'rb') as src, open(tmp, 'wb') as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise DataError(f'{source} is damaged ({e}): reinstall it (apt-get install --reinstall '
                                f'dataset-fashion-mnist) or pass --dataset-download.') from e
        return os.fspath(cache)
    looked = ', '.join([f'{data_dir}/FashionMNIST/raw/'] * bool(data_dir) + [os.fspath(debian)])
    raise DataError(
        f'Fashion-MNIST not found (looked for its IDX files in {looked}). Install the Debian package '
        f'(apt-get install dataset-fashion-mnist), or pass --dataset-download to fetch it with torchvision '
        f'(needs a network), or give --data-dir DIR with DIR/FashionMNIST/raw/{MNIST_RAW_FILES[0]} etc.')


class TorchvisionImages(torch.utils.data.Dataset):
    """A torchvision data set whose PIL images are converted to `img_mode` ('L', 'RGB') before `transform`.

    torchvision's MNIST family gives grey images and CIFAR colour ones; a model's `in_chans` decides what it gets.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, img_mode: str = 'RGB'):
        self.dataset = dataset
        self.dataset.transform = None
        self.img_mode = img_mode
        self.transform: Optional[Callable] = None

    @property
    def classes(self) -> Optional[List[str]]:
        return getattr(self.dataset, 'classes', None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        if img.mode != self.img_mode:
            img = img.convert(self.img_mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def default_in_chans(dataset: str = '', data_dir: Optional[str] = None) -> int:
    """Input channels a data set's images have: 1 for the digits and the MNIST family, else 3."""
    name = (dataset or '').lower()
    if name in ('', 'digits') and not data_dir:
        return 1
    if name.startswith('torch/') and name[len('torch/'):] in _GREY_TORCH_DATASETS:
        return 1
    return 3


def dataset_key(dataset: str = '', data_dir: Optional[str] = None) -> Optional[str]:
    """The hub_cards/models.yaml data set key of `--dataset` (e.g. 'fmnist' for torch/fashion_mnist), or None."""
    name = (dataset or '').lower()
    if name == '' and not data_dir:
        name = 'digits'
    return _CARD_KEYS.get(name)


def build_torch_datasets(name: str, data_dir: Optional[str], train_split: str = 'train',
                         val_split: str = 'validation', download: bool = False,
                         input_img_mode: str = 'RGB') -> Tuple[TorchvisionImages, TorchvisionImages]:
    """Train and test sets of a `torch/NAME` data set through `timm.data.create_dataset`, as timm's train.py
    builds them. torchvision's sets have two splits: train and test (timm reads every evaluation split name,
    'validation' included, as the test set)."""
    short = name.partition('/')[2].lower()
    if short not in TORCH_DATASETS:
        raise DataError(f'unknown --dataset {name!r}: the torchvision data sets are '
                        f'{", ".join("torch/" + n for n in TORCH_DATASETS)}.')
    if train_split not in _TRAIN_SPLIT_NAMES:
        raise DataError(f'--train-split {train_split!r}: {name} has a train and a test split; use train.')
    if val_split not in _VAL_SPLIT_NAMES + ('test',):
        raise DataError(f'--val-split {val_split!r}: {name} has a train and a test split; use test '
                        f'(or validation, which timm reads as test).')
    if short == 'fashion_mnist':
        root = fashion_mnist_root(data_dir, download)
    elif data_dir or download:
        root = data_dir or os.fspath(data_cache_dir())
    else:
        raise DataError(f'--dataset {name} needs --data-dir DIR holding torchvision\'s files '
                        f'(DIR/{TORCH_DATASETS[short]}/...), or --dataset-download to fetch them (needs a network).')
    if download:
        os.makedirs(root, exist_ok=True)
    try:
        train_ds = create_dataset(name, root=root, split=train_split, download=download)
        val_ds = create_dataset(name, root=root, split=val_split, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f'--dataset {name}: {e} (looked under {root}/{TORCH_DATASETS[short]}). Give --data-dir '
                        f'with torchvision\'s files, or pass --dataset-download.') from e
    return TorchvisionImages(train_ds, input_img_mode), TorchvisionImages(val_ds, input_img_mode)
