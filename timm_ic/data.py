"""The embedded default data set: scikit-learn's bundled handwritten digits (real data, offline).

1,797 grey 8x8 images of the digits 0-9. They are served as PIL images, like any `timm.data` image
dataset, so the model's own transforms (`resolve_data_config` + `create_transform`) apply unchanged.
"""
from typing import Callable, Optional

import numpy as np
import torch.utils.data
from PIL import Image

DIGITS_CLASSES = tuple(str(i) for i in range(10))


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
