"""Small, seeded experiments at CPU scale, on real data that ships inside scikit-learn.

One module per subject: ``data`` (the digits), ``models`` (the networks), ``training`` (the
loops), ``probes`` (measuring a network while it trains). Chapter-specific studies get a module
of their own, named for their subject. Every public name is re-exported here.
"""
from .data import Digits, load_digits
from .models import NoisyBatchNorm1d, digits_cnn, digits_mlp
from .probes import (TrainingProbe, activation_inputs, companion_outputs, frozen_buffers,
                     loss_along_gradient)
from .training import History, accuracy, batch_size_sweep, shuffled_batches, train

__all__ = [
    "Digits", "load_digits",
    "NoisyBatchNorm1d", "digits_cnn", "digits_mlp",
    "TrainingProbe", "activation_inputs", "companion_outputs", "frozen_buffers",
    "loss_along_gradient",
    "History", "accuracy", "batch_size_sweep", "shuffled_batches", "train",
]
