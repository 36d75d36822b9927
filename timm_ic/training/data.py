"""Training and validation data sets for `train.py`, with input checks that fail fast and say how to fix things.

Sources, all through `timm.data.create_dataset` except the embedded default:
- nothing given: scikit-learn's bundled handwritten digits (`timm_ic.data.DigitsDataset`);
- `--data-dir DIR`: an ImageNet-layout folder, `DIR/train/<class>/*.jpg` and `DIR/val/<class>/*.jpg`
  (timm's split synonyms `training`, `validation`, `valid`, `eval` work too);
- `--dataset hfds/NAME` (Hugging Face datasets, a Hub name or a local copy) and `--dataset wds/NAME`
  (WebDataset shards under `--data-dir`);
- `--dataset torch/NAME` (torchvision's `fashion_mnist`, `mnist`, `kmnist`, `cifar10`, `cifar100`), as timm's
  own train.py takes them: the files torchvision reads under `--data-dir`, or `--dataset-download`. Fashion-MNIST
  also comes from the Debian package `dataset-fashion-mnist` when installed (see `fashion_mnist_root`).
"""
import argparse
import logging
import multiprocessing
import os
import random
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn
import torch.utils.data
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from timm.data import ImageDataset, create_dataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import DataLoader, IterableDataset

from ..data import (  # the data sets themselves, shared with the diagnostics; re-exported for train.py
    DATA_CACHE_ENV, FASHION_MNIST_DEBIAN_DIR, FASHION_MNIST_DEBIAN_ENV, MNIST_RAW_FILES, TORCH_DATASETS, DataError,
    TorchvisionImages, _TRAIN_SPLIT_NAMES, _VAL_SPLIT_NAMES, build_torch_datasets, data_cache_dir, dataset_key,
    default_in_chans, fashion_mnist_root,
)
from .errors import UsageError

_logger = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """An image file could not be decoded and `--bad-images fail` is in force."""


class _DatasetWrapper(torch.utils.data.Dataset):
    """A dataset around `self.dataset` whose `transform` is the wrapped one's, so timm's loaders can set it."""

    @property
    def transform(self) -> Optional[Callable]:
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Optional[Callable]) -> None:
        self.dataset.transform = transform


class CheckedImageDataset(_DatasetWrapper):
    """A timm `ImageDataset` whose unreadable images either stop the run or are skipped and counted.

    timm's own `ImageDataset` silently moves on to the next sample; here `on_bad='fail'` raises
    `BadImageError` naming the file, and `on_bad='skip'` substitutes the next readable sample and counts the
    skip in a counter shared with data-loader worker processes (`skipped`).
    """

    def __init__(self, dataset: ImageDataset, on_bad: str = 'fail'):
        if on_bad not in ('fail', 'skip'):
            raise ValueError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}")
        self.dataset = dataset
        self.on_bad = on_bad
        # a process-shared integer so that skips inside DataLoader workers reach the main process
        self._skipped = multiprocessing.get_context('fork').Value('l', 0)

    @property
    def skipped(self) -> int:
        """How many unreadable-image reads were skipped so far (every epoch counts again)."""
        return int(self._skipped.value)

    @property
    def reader(self):
        return self.dataset.reader

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int):
        reader = self.dataset.reader
        try:
            fileobj, target = reader[index][:2]
            img = Image.open(fileobj)
            img = img.convert(self.dataset.input_img_mode or 'RGB')  # decodes the pixels: truncated files fail here
            return img, target
        except (OSError, ValueError, SyntaxError) as e:  # PIL reports bad files as OSError (UnidentifiedImageError)
            name = reader.filename(index, absolute=True)
            if self.on_bad == 'fail':
                raise BadImageError(
                    f'unreadable image {name}: {e}. Replace or delete the file, or pass --bad-images skip '
                    f'to skip unreadable images (they are counted in run.json).') from e
            with self._skipped.get_lock():
                self._skipped.value += 1
            _logger.warning(f'skipped unreadable image {name}: {e}')
            return None

    def __getitem__(self, index: int):
        n = len(self.dataset.reader)
        for attempt in range(n):
            loaded = self._load((index + attempt) % n)
            if loaded is not None:
                break
        else:
            raise BadImageError('no image of the data set could be read')
        img, target = loaded
        if self.dataset.transform is not None:
            img = self.dataset.transform(img)
        if target is None:
            target = -1
        elif self.dataset.target_transform is not None:
            target = self.dataset.target_transform(target)
        return img, target


class SeededAugmentation(_DatasetWrapper):
    """Draws each training sample's random augmentation from its own seed, a function of (seed, epoch, index).

    torch's global RNG is left as it was, so data loading does not disturb dropout draws, and a sample
    looks the same whichever process or worker loads it and however far ahead the loader prefetches: a run
    resumed mid-epoch sees exactly the batches the uninterrupted run saw. Call `set_epoch` at every epoch start.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        # shared with data-loader workers, persistent ones included, so they follow set_epoch
        self._epoch = multiprocessing.Value('l', 0, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def skipped(self) -> int:
        return getattr(self.dataset, 'skipped', 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = hash((self.seed, int(self._epoch.value), int(index))) & 0x7FFF_FFFF_FFFF_FFFF
        # timm's transforms draw from torch's and Python's global RNGs. torch's is put back afterwards (dropout
        # draws from it); Python's is only used by transforms here, and every sample reseeds it, so saving and
        # restoring it (~10 us a sample) is skipped. The CPU generator directly: torch.manual_seed costs ~90 us.
        generator = torch.default_generator
        torch_state = generator.get_state()
        generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(torch_state)


def _find_split_dir(root: str, split: str, synonyms: Tuple[str, ...]) -> Optional[str]:
    for name in (split,) + synonyms:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def _check_class_folders(split_dir: str) -> List[str]:
    """Class folder names of an ImageNet-layout split folder; raises `DataError` on empty folders."""
    extensions = get_img_extensions(as_set=True)
    class_dirs = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))
    if not class_dirs:
        raise DataError(
            f'data folder {split_dir} has no class folders; it must hold one sub-folder per class with the images '
            f'inside (e.g. {split_dir}/cat/1.jpg).')
    empty = []
    for name in class_dirs:
        has_image = any(os.path.splitext(f)[1].lower() in extensions
                        for _, _, files in os.walk(os.path.join(split_dir, name)) for f in files)
        if not has_image:
            empty.append(name)
    if empty:
        raise DataError(
            f'class folder(s) with no images in {split_dir}: {", ".join(empty)}. Add images '
            f'({", ".join(sorted(extensions))}) or remove the folder(s); an empty class would shift every label.')
    return class_dirs


def _check_folder(root: str, train_split: str, val_split: str) -> Tuple[str, str]:
    if not os.path.exists(root):
        raise DataError(
            f'data folder {root} does not exist. Pass --data-dir DIR with DIR/train/<class>/*.jpg and '
            f'DIR/val/<class>/*.jpg, or leave --data-dir out to train on the embedded digits.')
    if not os.path.isdir(root):
        raise DataError(f'--data-dir {root} is a file, not a folder.')
    if not any(True for _ in os.scandir(root)):
        raise DataError(f'data folder {root} is empty: it needs train/<class>/ and val/<class>/ image folders.')
    train_dir = _find_split_dir(root, train_split, _TRAIN_SPLIT_NAMES)
    val_dir = _find_split_dir(root, val_split, _VAL_SPLIT_NAMES)
    if train_dir is None or val_dir is None:
        missing = ' and '.join(n for n, d in (('train/', train_dir), ('val/', val_dir)) if d is None)
        raise DataError(
            f'data folder {root} has no {missing} folder; it needs train/<class>/ and val/<class>/ image folders '
            f'(also accepted: {", ".join(_TRAIN_SPLIT_NAMES + _VAL_SPLIT_NAMES)}).')
    train_classes = _check_class_folders(train_dir)
    val_classes = _check_class_folders(val_dir)
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise DataError(
            f'{val_dir} has class folder(s) that {train_dir} lacks: {", ".join(unknown)}. '
            f'Both splits must use the same class names.')
    return train_dir, val_dir


def class_names_of(dataset: torch.utils.data.Dataset) -> Optional[List[str]]:
    """Label names in index order, from the dataset's `classes` or its reader's `class_to_idx`."""
    if getattr(dataset, 'classes', None) is not None:
        return [str(c) for c in dataset.classes]
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) if reader is not None else None
    if class_to_idx:
        return [str(name) for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    return None


def build_datasets(
        dataset: str = '',
        data_dir: Optional[str] = None,
        train_split: str = 'train',
        val_split: str = 'validation',
        input_img_mode: str = 'RGB',
        bad_images: str = 'fail',
        seed: int = 42,
        batch_size: int = 1,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        download: bool = False,
) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, Optional[List[str]]]:
    """Train and validation data sets (transforms unset) and the label names, checking the input first.

    `download` lets torchvision (`torch/NAME`) fetch its files, as timm's `--dataset-download`."""
    name = dataset or ''
    if name in ('', 'digits') and not data_dir:
        from timm_ic.data import DigitsDataset
        train_ds, val_ds = DigitsDataset('train'), DigitsDataset('val')
        return train_ds, val_ds, list(train_ds.classes)

    prefix = name.partition('/')[0].lower() if '/' in name else ''
    if prefix in ('', 'folder'):
        if not data_dir:
            raise DataError('--dataset folder needs --data-dir DIR (with train/ and val/ class folders).')
        train_dir, val_dir = _check_folder(data_dir, train_split, val_split)
        train_ds = create_dataset('', root=train_dir, split='train', search_split=False,
                                  input_img_mode=input_img_mode)
        # the validation labels must use the training folder's class indices, even if a class is absent there
        val_ds = create_dataset('', root=val_dir, split='validation', search_split=False,
                                class_map=dict(train_ds.reader.class_to_idx), input_img_mode=input_img_mode)
    elif prefix == 'hfds':
        # a local copy works too: hfds/<folder> is handed to datasets.load_dataset as its path
        keys = {k: v for k, v in (('input_key', input_key), ('target_key', target_key)) if v}
        train_ds = create_dataset(name, root=data_dir, split=train_split, input_img_mode=input_img_mode, **keys)
        val_ds = create_dataset(name, root=data_dir, split=val_split, input_img_mode=input_img_mode, **keys)
    elif prefix == 'torch':
        train_ds, val_ds = build_torch_datasets(name, data_dir, train_split, val_split, download, input_img_mode)
    elif prefix == 'wds':
        if not data_dir:
            raise DataError(f'--dataset {name} needs --data-dir pointing at the folder with the .tar shards.')
        # is_training shuffles shards and samples; the seed keeps every process on the same shard order
        keys = {k: v for k, v in (('input_key', input_key), ('target_key', target_key)) if v}
        train_ds = create_dataset(name, root=data_dir, split=train_split, is_training=True, seed=seed,
                                  batch_size=batch_size, input_img_mode=input_img_mode, **keys)
        val_ds = create_dataset(name, root=data_dir, split=val_split, batch_size=batch_size,
                                input_img_mode=input_img_mode, **keys)
    else:
        raise DataError(
            f'unknown --dataset {name!r}: use digits (the default), folder (with --data-dir), hfds/NAME '
            f'(Hugging Face datasets, a Hub name or local folder), wds/NAME (WebDataset shards in --data-dir) '
            f'or torch/NAME (torchvision: {", ".join(TORCH_DATASETS)}).')

    if isinstance(train_ds, ImageDataset):
        if len(train_ds) == 0 or len(val_ds) == 0:
            raise DataError(f'the {"training" if len(train_ds) == 0 else "validation"} split of {name or data_dir} '
                            f'has no samples.')
        train_ds = CheckedImageDataset(train_ds, bad_images)
        val_ds = CheckedImageDataset(val_ds, bad_images)
    return train_ds, val_ds, class_names_of(train_ds)


def check_num_classes(requested: Optional[int], label_names: Optional[List[str]], source: str) -> int:
    """The number of classes to build the model with: the data set's, which `--num-classes` must agree with."""
    if label_names is None:
        if requested is None:
            raise DataError(f'the number of classes of {source} is not known; pass --num-classes N.')
        return requested
    if requested is not None and requested != len(label_names):
        shown = ', '.join(label_names[:10]) + (', ...' if len(label_names) > 10 else '')
        raise DataError(
            f'--num-classes {requested} does not match the data: {source} has {len(label_names)} classes '
            f'({shown}). Drop --num-classes to use the data\'s count.')
    return len(label_names)


# --- transforms and loaders (train.py) ---

def resolve_transforms(args: argparse.Namespace, model: nn.Module, in_chans: int) -> Tuple[Dict, Callable, Callable]:
    """Data config from the model's pretrained_cfg and the options, then timm's train / eval transforms."""
    overrides = {k: getattr(args, k) for k in ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')}
    overrides['in_chans'] = in_chans
    cfg = model.pretrained_cfg
    for key in ('mean', 'std'):  # a grey-scale input with a colour model's statistics: use their average
        if overrides[key] is None and len(cfg.get(key) or ()) not in (0, in_chans):
            overrides[key] = [sum(cfg[key]) / len(cfg[key])]
    size = cfg.get('input_size')
    if overrides['input_size'] is None and not overrides['img_size'] and size and size[0] != in_chans:
        overrides['input_size'] = (in_chans, *size[1:])  # timm takes the cfg's size whole, channels included
    data_config = resolve_data_config(overrides, model=model)
    if data_config['input_size'][0] != in_chans:
        raise UsageError(f'--input-size has {data_config["input_size"][0]} channels but the model takes {in_chans}.')
    train_kwargs: Dict[str, Any] = dict(
        is_training=True, no_aug=args.no_aug, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, re_prob=args.reprob)
    if args.scale is not None:
        train_kwargs['scale'] = tuple(args.scale)
    if args.ratio is not None:
        train_kwargs['ratio'] = tuple(args.ratio)
    train_transform = create_transform(**data_config, **train_kwargs)
    eval_transform = create_transform(**data_config, is_training=False)
    return data_config, train_transform, eval_transform



def prepare_loader(accelerator: Accelerator, loader: DataLoader, workers: int) -> DataLoader:
    """Accelerate's loader: each process takes its share of the batches, on its device.

    An iterable data set (WebDataset shards) is already split by timm's reader, which gives each process its own
    shards in equal sample counts (as timm's train.py expects): Accelerate only moves its batches to the device,
    as it would for one process, instead of splitting them again.
    """
    if not isinstance(loader.dataset, IterableDataset):
        return accelerator.prepare(loader)
    if hasattr(loader.dataset, 'set_loader_cfg'):
        loader.dataset.set_loader_cfg(num_workers=workers)  # its per-worker sample counts depend on it
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True,
                               dispatch_batches=False, non_blocking=True)



def num_samples(dataset) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:  # an iterable data set without a length
        return None

