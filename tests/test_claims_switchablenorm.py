"""The switchablenorm chapter trains five seeds of a digits_cnn with normcode.SwitchNorm2d as
one packed network (each member keeps its own SwitchNorm2d modules). Its claims about the
learned importance weights hold only if a packed member computes what it would alone."""
import pytest

import normcode

from conftest import packed_equals_alone
from normcode.experiments.batch_size import Member

NORMS = {"SwitchNorm2d": normcode.SwitchNorm2d}


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_packed_members_train_as_if_alone(norm):
    # unequal learning rates too: the pack scales each member's gradient
    packed_equals_alone(norm, [Member(0, 0.1), Member(4, 0.2)], steps=10)
