"""Shared test setup: hypothesis profiles, devices, input layouts, and the differences report.

Profiles (choose with HYPOTHESIS_PROFILE=...; "ci" is the default):
  ci        200 examples per property, derandomized, so every run draws the same examples
  dev       25 examples, for a quick local loop
  thorough  2000 examples, random seeds, for a night run
"""
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=25)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=2000,
                          derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Every parity test runs on each of these.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: Input layouts by name: how an (N, C, *) tensor of a given shape lies in memory.
LAYOUTS = {
    "contiguous": lambda x: x.contiguous(),
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),        # 4D only
    "channels_last_3d": lambda x: x.contiguous(memory_format=torch.channels_last_3d),  # 5D only
}


def make_input(shape, layout="contiguous", *, dtype=torch.float64, device="cpu", seed=0,
               mean=1.0, std=2.0):
    """A random input of ``shape`` in ``layout``: values of mean 1 and std 2 unless told, so that
    a missing centring or scaling shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    return LAYOUTS[layout](x.to(dtype=dtype, device=device))


# --------------------------------------------------------------------------------------------
# The largest differences from torch.nn seen in this run, per dtype: tests hand in the dicts
# normcode.testing.assert_matches_torch returns; the terminal summary prints the maxima. Under
# xdist each worker sends its maxima to the controller when it finishes.
# --------------------------------------------------------------------------------------------
_DIFFS = {}          # dtype name -> (largest |ours - torch's|, where)


def record_diffs(test_id, dtype, diffs):
    """Remember ``diffs`` (quantity -> max abs difference) of test ``test_id`` run in ``dtype``,
    filed by dtype and kind of quantity (output, gradient, buffer)."""
    for what, value in diffs.items():
        kind = "gradients" if "gradient" in what else "buffers" if "buffer" in what else "outputs"
        key = f"{str(dtype).replace('torch.', '')} {kind}"
        if value > _DIFFS.get(key, (-1.0, ""))[0]:
            _DIFFS[key] = (value, f"{test_id}: {what}")


@pytest.fixture
def record(request):
    """``record(dtype, diffs)`` files the differences of the running test under its id."""
    return lambda dtype, diffs: record_diffs(request.node.nodeid, dtype, diffs)


def _merge(found):
    for key, (value, where) in found.items():
        if value > _DIFFS.get(key, (-1.0, ""))[0]:
            _DIFFS[key] = (value, where)


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):          # an xdist worker: report to the controller
        session.config.workeroutput["normcode_diffs"] = json.dumps(_DIFFS)


class _CollectFromWorkers:
    """xdist's hook, registered only where xdist is loaded (pytest rejects unknown hooks)."""

    @staticmethod
    def pytest_testnodedown(node, error):
        found = getattr(node, "workeroutput", {}).get("normcode_diffs")
        if found:
            _merge(json.loads(found))


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_CollectFromWorkers(), "normcode-diffs-from-workers")


def pytest_terminal_summary(terminalreporter):
    if not _DIFFS:
        return
    terminalreporter.section("largest differences from torch.nn (ours - torch's, max abs)")
    for key, (value, where) in sorted(_DIFFS.items()):
        terminalreporter.write_line(f"{key:>18}: {value:.3g}  at {where}")


@pytest.fixture(autouse=True)
def _seed_the_global_rng():
    """A test that draws from torch's global RNG gets the same data whatever xdist ran before it
    in the same worker (tests should still pass their own seeded Generator)."""
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# The packed batch-size studies (groupnorm, switchablenorm) train many seeds as one network;
# their claims hold only if a packed member computes what the same model trained alone does.
# --------------------------------------------------------------------------------------------
def packed_equals_alone(norm, members, steps=20, batch_size=4, momentum=0.9):
    """Assert that every member of a packed ``digits_cnn(norm)`` study, trained ``steps`` steps
    in float64, gives the outputs of the same model trained alone by ``train``."""
    from normcode.experiments import digits_cnn, load_digits, train
    from normcode.experiments.batch_size import PackedCNN, members_data, train_packed

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
