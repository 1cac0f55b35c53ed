"""The groupnorm chapter's batch-size study trains ten seeds as one packed network. Its claims
hold only if a packed member computes what the same ``digits_cnn`` trained alone computes:
same data split, initialization, batch order and learning rate."""
import pytest
import torch
from torch import nn

from conftest import packed_equals_alone
from normcode.experiments import digits_cnn, load_digits, train
from normcode.experiments.batch_size import Member, PackedCNN, members_data, train_packed

NORMS = {"BatchNorm2d": nn.BatchNorm2d, "GroupNorm(4, c)": lambda c: nn.GroupNorm(4, c)}


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_packed_members_train_as_if_alone(norm):
    # unequal learning rates too: the pack scales each member's gradient
    packed_equals_alone(norm, [Member(0, 0.05), Member(3, 0.2), Member(7, 0.05)])


def test_a_broken_pack_is_caught():
    """The check can fail: a member whose batches come from another seed's order differs."""
    members = [Member(0, 0.05), Member(1, 0.05)]
    x_train, y_train, _, _ = members_data(members, 0.5, torch.float64)
    swapped = [Member(1, 0.05), Member(0, 0.05)]      # batch orders of the other member
    packed = PackedCNN([digits_cnn(nn.BatchNorm2d, seed=m.seed).double() for m in members])
    train_packed(packed, swapped, x_train, y_train, steps=5, batch_size=4, lr_scale=1 / 8)
    data = load_digits(test_fraction=0.5, seed=0, dtype=torch.float64)
    alone = digits_cnn(nn.BatchNorm2d, seed=0).double()
    train(alone, data, steps=5, batch_size=4, lr=0.05 / 8, seed=0)
    packed.eval(), alone.eval()
    with torch.no_grad():
        assert not torch.allclose(packed(x_train[:8])[:, 0], alone(data.x_train[:8]))
