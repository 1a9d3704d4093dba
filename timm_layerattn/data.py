"""Datasets and transforms the trainer adds to timm's: the embedded digits set and the CIFAR pad-and-crop.

`DigitsDataset` is scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download),
upscaled to 32x32 RGB so the CIFAR-sized models take it as is. Its train/val split is fixed (stratified,
20% per class held out, chosen by a seeded legacy NumPy permutation that does not change between
NumPy/scikit-learn versions), so accuracies are comparable between runs and machines.

`cifar_train_transform` is the augmentation of the ResNet/CIFAR papers (zero-pad 4 px, random crop back,
horizontal flip), which timm's transform factory has no mode for.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ._utils.errors import UserError

__all__ = ['DigitsDataset', 'DIGITS_NAMES', 'cifar_train_transform', 'is_embedded_dataset', 'require_demo_extra']

# Names under which the trainer accepts the embedded digits set as `--dataset`.
DIGITS_NAMES = ('digits', 'sklearn/digits')


def is_embedded_dataset(name: str) -> bool:
    return (name or '').lower() in DIGITS_NAMES


def require_demo_extra(*modules: str) -> None:
    """Fail with the install command if an optional dependency of the demo / digits data is missing."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pip_names = {'sklearn': 'scikit-learn'}
        raise UserError(
            f'{", ".join(pip_names.get(m, m) for m in missing)} not installed; '
            f'install the demo extra: pip install "timm-layerattn[demo]"')


def _digits_split(labels: torch.Tensor, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    import numpy as np
    rng = np.random.RandomState(seed)  # legacy generator: a stable stream across NumPy versions
    train, val = [], []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels.numpy() == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as 32x32 RGB PIL images, with a fixed stratified train/val split.

    Items are `(image, label)` with `transform` applied to the PIL image, like torchvision's datasets, so
    timm's transforms and the trainer's loaders treat it like any other dataset.

    Args:
        split: 'train' or 'val' ('validation' / 'test' are accepted for 'val').
        img_size: side of the upscaled square image.
        transform: applied to each PIL image.
        val_fraction: share of each class held out for validation.
        seed: seed of the split (keep the default for comparable numbers).
    """
    classes = [str(i) for i in range(10)]

    def __init__(
            self,
            split: str = 'train',
            img_size: int = 32,
            transform: Optional[Callable] = None,
            val_fraction: float = 0.2,
            seed: int = 0,
    ):
        require_demo_extra('sklearn')
        from sklearn.datasets import load_digits
        split = {'validation': 'val', 'test': 'val', 'eval': 'val'}.get(split, split)
        if split not in ('train', 'val'):
            raise UserError(f'digits dataset has splits "train" and "val", not {split!r}')
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.  # N,1,8,8 in [0, 1]
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = _digits_split(labels, val_fraction, seed)
        idx = torch.tensor(train_idx if split == 'train' else val_idx)
        images = torch.nn.functional.interpolate(images[idx], size=(img_size, img_size), mode='bilinear',
                                                 align_corners=False)
        self.images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        self.targets = labels[idx].tolist()
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image
        img = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())  # HxWx3 uint8 -> RGB
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def mean_std(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Per-channel mean and std of this split in [0, 1] units (use the train split's for normalisation)."""
        x = self.images.float() / 255.
        mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
        return tuple(round(v, 4) for v in mean), tuple(round(v, 4) for v in std)


def cifar_train_transform(
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 4,
        hflip: float = 0.5,
) -> Callable:
    """The ResNet paper's CIFAR augmentation: zero-pad `padding` px, random `img_size` crop, flip.

    Images of another size are first resized (shorter side) and center-cropped to `img_size`, which leaves
    CIFAR-sized inputs untouched.
    """
    from torchvision import transforms as T
    ops = [T.Resize(img_size), T.CenterCrop(img_size), T.RandomCrop(img_size, padding=padding, fill=0)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(p=hflip))
    ops += [T.ToTensor(), T.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    return T.Compose(ops)
