"""The data every training chapter uses: scikit-learn's digits, which ship inside the package.

``load_digits`` holds 1,797 real 8x8 handwritten digits: the stand-in for MNIST in every
chapter that trains a network. Nothing here downloads anything.
"""
from dataclasses import dataclass

import torch


@dataclass
class Digits:
    """The digits, split once into train and test, as float tensors."""
    x_train: torch.Tensor        # (N_train, 1, 8, 8), pixel values scaled to [0, 1]
    y_train: torch.Tensor        # (N_train,) labels 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor

    def flat(self):
        """The same split with images flattened to (N, 64), for fully connected networks."""
        return Digits(self.x_train.flatten(1), self.y_train, self.x_test.flatten(1), self.y_test)


def load_digits(test_fraction=0.25, seed=0, dtype=torch.float32):
    """scikit-learn's digits, shuffled with ``seed`` and split into train and test."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0      # (1797, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])
