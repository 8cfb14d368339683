"""The default job of `lepton train`: scikit-learn's bundled 8x8 digits (no download) and an MLP of
lc.nn.Linear layers.

1797 images, 10 classes; a fixed stratified split (80% train / 20% test, the same whatever the
training seed, so runs with different seeds or settings are scored on the same 360 images).
Training images are shifted by up to one pixel at random (a cheap augmentation worth about a point
of test accuracy for an MLP on this data).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import nn as lnn
from . import _deps

IMAGE_SIDE = 8
N_FEATURES = IMAGE_SIDE * IMAGE_SIDE
N_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load() -> Tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of (float32 pixels in [0, 1], shape (64,); int64 label)."""
    _deps.require(("sklearn",), "lepton_core.train.digits", "train")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=TEST_FRACTION,
                                           random_state=SPLIT_SEED, stratify=y.numpy())
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_test], y[idx_test])


class Standardize(nn.Module):
    """(x - mean) / std with constants (no parameters, nothing to communicate)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean:.4f}, std={self.std:.4f}"


def build_model(train: TensorDataset, hidden: int = 256, depth: int = 2, dropout: float = 0.1) -> nn.Module:
    """64 -> hidden (x depth, ReLU + dropout) -> 10, every matmul an lc.nn.Linear."""
    pixels = train.tensors[0]
    layers = [Standardize(pixels.mean().item(), pixels.std().item())]
    width = N_FEATURES
    for _ in range(depth):
        layers += [lnn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    layers.append(lnn.Linear(width, N_CLASSES))
    return nn.Sequential(*layers)


def shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Moves each (flattened 8x8) image by -max_shift..max_shift pixels in x and y, filling with 0."""
    n = x.shape[0]
    s = max_shift
    img = nn.functional.pad(x.reshape(n, IMAGE_SIDE, IMAGE_SIDE), (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=generator).to(x.device)
    ar = torch.arange(IMAGE_SIDE, device=x.device)
    rows = (dy[:, None] + ar[None, :])[:, :, None]  # (n, 8, 1)
    cols = (dx[:, None] + ar[None, :])[:, None, :]  # (n, 1, 8)
    out = img[torch.arange(n, device=x.device)[:, None, None], rows, cols]
    return out.reshape(n, N_FEATURES)
