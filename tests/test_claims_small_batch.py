"""The seed claims of chapters/weight_normalization.ipynb that the chapter does not run itself,
at the chapter's size: GroupNorm with weight standardization against GroupNorm alone at batch
1 (one image per step) and against BatchNorm there, over seeds 0-2."""
import pytest
import torch

import normcode
from normcode.experiments import digits_cnn, load_digits
from normcode.experiments import small_batch as sb

SEEDS = (0, 1, 2)


def gn(c):
    return normcode.GroupNorm(4, c)


@pytest.fixture(scope="module")
def batch_one():
    torch.set_num_threads(1)
    data = load_digits()
    runs = sb.small_batch_study(lambda norm, seed: digits_cnn(norm, seed=seed),
                                {"BN": normcode.BatchNorm2d, "GN": gn}, data,
                                batch_sizes=(1,), samples=800, lr=0.05, seeds=SEEDS)
    runs.update(sb.small_batch_study(lambda norm, seed: sb.std_conv_cnn(gn, seed=seed),
                                     {"GN+WS": None}, data, batch_sizes=(1,), samples=800,
                                     lr=0.05, seeds=SEEDS))
    return runs


def test_gn_ws_beats_gn_at_batch_one_for_every_seed(batch_one):
    for s in SEEDS:
        assert batch_one["GN+WS", 1, s][1] > batch_one["GN", 1, s][1], s


def test_batchnorm_fails_at_batch_one_and_gn_ws_does_not(batch_one):
    """One image's positions are BatchNorm's whole statistics set: it trains, but to a model
    that is poor in both modes (below 50% test accuracy for every seed)."""
    for s in SEEDS:
        assert max(batch_one["BN", 1, s]) < 0.5, s
        assert batch_one["GN+WS", 1, s][1] > max(batch_one["BN", 1, s]), s


def test_group_norm_has_no_train_eval_gap(batch_one):
    for (name, *_), (train_acc, eval_acc) in batch_one.items():
        if name != "BN":
            assert abs(train_acc - eval_acc) < 0.01, name



def _alone(make, seed, data, batch_size, batches, schedule):
    model = make(seed).double()
    sb.fit(model, data, samples=40 * batch_size, batch_size=batch_size, lr=0.05, seed=seed,
           batches=batches, schedule=schedule)
    return model.eval()


@pytest.mark.parametrize("batch_size", (2, 8))
def test_packed_members_train_as_if_alone(batch_size):
    """The chapters train their seeds and norms as one PackedDigitsCNN: each member must
    compute what the same model trained alone computes (float64, 40 steps, mixed norms and
    convolutions, BatchRenorm's schedule, i.i.d. and two-class batches)."""
    data = load_digits(dtype=torch.float64)
    makers = [lambda s: digits_cnn(normcode.BatchNorm2d, seed=s),
              lambda s: digits_cnn(normcode.BatchRenorm2d, seed=s),
              lambda s: digits_cnn(gn, seed=s), lambda s: sb.std_conv_cnn(gn, seed=s)]
    members = [(make, s) for make in makers for s in (0, 1)]
    schedule = sb.paper_schedule(40)
    batches = (sb.iid_batches if batch_size == 2 else
               lambda y, b, s, g: sb.few_class_batches(y, b, s, g, 2))
    packed = sb.PackedDigitsCNN([make(s).double() for make, s in members])
    sb.fit_packed(packed, data, samples=40 * batch_size, batch_size=batch_size, lr=0.05,
                  seeds=[s for _, s in members], batches=batches, schedule=schedule)
    packed.eval()
    x = data.x_test[:64]
    with torch.no_grad():
        out = packed(x.expand(-1, len(members), -1, -1))
    for k, (make, s) in enumerate(members):
        alone = _alone(make, s, data, batch_size, batches, schedule)
        with torch.no_grad():
            torch.testing.assert_close(out[:, k], alone(x), rtol=0, atol=1e-9)
