"""Synthetic data for the corpus: tiny, learnable, generated from seeded generators."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.helpers import digits


def loader(dataset: Dataset, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
           **kwargs: object) -> DataLoader:
    """A DataLoader; a training one shuffles with its own seeded generator."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      **kwargs)  # type: ignore[arg-type]


def split(data: TensorDataset, n_train: int, batch_size: int = 32, val_batch_size: int = 64,
          ) -> tuple[DataLoader, DataLoader]:
    """The first ``n_train`` samples for training (shuffled), the rest for validation."""
    train = TensorDataset(*(t[:n_train] for t in data.tensors))
    val = TensorDataset(*(t[n_train:] for t in data.tensors))
    return loader(train, batch_size), loader(val, val_batch_size, shuffle=False)


def teacher_logits(n: int, dim: int, classes: int, seed: int, scale: float = 2.0,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``x ~ N(0, I)``, a random linear teacher ``W`` and its logits ``scale * x W``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g) / dim**0.5
    return x, w, scale * x @ w


def gaussian_classes(n: int = 512, dim: int = 16, classes: int = 4, seed: int = 0,
                     noise: float = 0.3, priors: list[float] | None = None,
                     ) -> TensorDataset:
    """``(x, y)``: y the argmax of a linear teacher's logits plus Gumbel-like noise, so that the
    classes overlap a little (validation accuracy below 100%); ``priors`` tilt the classes."""
    x, _, logits = teacher_logits(n, dim, classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    logits = logits + noise * torch.randn(logits.shape, generator=g)
    if priors is not None:
        logits = logits + torch.tensor(priors).log()
    return TensorDataset(x, logits.argmax(1))


def digit_images(n_train: int = 1437, n_val: int = 360, batch_size: int = 32,
                 flatten: bool = False) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's digits (real 8x8 images in [0, 1]), split 80/20 in train and validation
    (a few epochs of a few batches never see a training image twice: no overfitting)."""
    data = digits(n_train + n_val, flatten=flatten)
    return split(data, n_train, batch_size)
