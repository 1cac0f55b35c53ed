"""The switchablenorm chapter trains five seeds of a digits_cnn with normcode.SwitchNorm2d as
one packed network (each member keeps its own SwitchNorm2d modules). Its claims about the
learned importance weights hold only if a packed member computes what it would alone."""
import pytest
import torch
from torch import nn

import normcode

from normcode.experiments import digits_cnn, load_digits, train
from normcode.experiments.batch_size import Member, PackedCNN, members_data, train_packed

NORMS = {"SwitchNorm2d": normcode.SwitchNorm2d}


def packed_equals_alone(norm, members, steps=20, batch_size=4, momentum=0.9):
    x_train, y_train, x_test, y_test = members_data(members, 0.5, torch.float64)
    packed = PackedCNN([digits_cnn(norm, seed=m.seed).double() for m in members])
    train_packed(packed, members, x_train, y_train, steps=steps, batch_size=batch_size,
                 lr_scale=batch_size / 32, momentum=momentum)
    packed.eval()
    with torch.no_grad():
        out = packed(x_test[:64])
    for k, m in enumerate(members):
        data = load_digits(test_fraction=0.5, seed=m.seed, dtype=torch.float64)
        alone = digits_cnn(norm, seed=m.seed).double()
        train(alone, data, steps=steps, batch_size=batch_size, lr=m.base_lr * batch_size / 32,
              seed=m.seed, momentum=momentum)
        alone.eval()
        with torch.no_grad():
            torch.testing.assert_close(out[:, k], alone(data.x_test[:64]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_packed_members_train_as_if_alone(norm):
    # unequal learning rates too: the pack scales each member's gradient
    packed_equals_alone(norm, [Member(0, 0.1), Member(4, 0.2)], steps=10)
