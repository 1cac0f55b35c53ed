"""normcode.SyncBatchNorm against torch.nn, and across real processes joined by gloo.

The multi-process tests start a few local workers with ``normcode.distributed.run_workers``.
Each worker computes single-process BatchNorm on the concatenated batch next to SyncBatchNorm
on its own shard and returns the largest differences; the test asserts on them in float64.
Worker functions live at module level so that the worker processes can import them.
"""
import copy
import datetime
import inspect
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normcode
from normcode.distributed import (SyncBatchNorm, ddp_worker, global_moments_two_pass,
                                  run_workers, shard_bounds)
from normcode.testing import assert_matches_torch, randomize_

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}   # float32: one rounding of a float64 result

#: Every case: the concatenated batch's shape, its split into consecutive shards (one per rank),
#: constructor options, dtype. Two training steps each, so the running statistics move twice.
CASES = {
    2: [
        ((8, 3), (4, 4), {}, torch.float64),
        ((9, 3, 5), (3, 6), {}, torch.float64),                       # uneven shards
        ((5, 2, 3, 4), (0, 5), {}, torch.float64),                    # an empty shard
        ((2, 4), (1, 1), {}, torch.float64),                          # one value per rank
        ((6, 2, 2, 3, 2), (2, 4), {"momentum": None}, torch.float64), # cumulative average
        ((6, 3, 4), (4, 2), {"affine": False}, torch.float64),
        ((6, 3, 4), (3, 3), {"bias": False}, torch.float64),
        ((6, 3, 4), (1, 5), {"track_running_stats": False}, torch.float64),
        ((0, 3, 4), (0, 0), {}, torch.float64),                       # nothing anywhere
        ((10, 3, 4, 4), (7, 3), {}, torch.float32),
        ((6, 3, 2, 5), (2, 4), {}, torch.float64, torch.channels_last),   # layout kept
    ],
    3: [
        ((9, 3), (3, 3, 3), {}, torch.float64),
        ((7, 2, 3, 3), (2, 0, 5), {}, torch.float64),
        ((2, 3, 4), (1, 0, 1), {"momentum": None}, torch.float64),
        ((11, 4, 3), (5, 1, 5), {"affine": False, "momentum": 0.3}, torch.float64),
    ],
}


def _torch_batchnorm(dim):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]


def _max_diff(a, b):
    if a is None or b is None:
        assert a is None and b is None, "one side is None"
        return 0.0
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


class _CountCollectives:
    """Counts calls of torch.distributed's all_gather and all_reduce in this worker process."""

    def __init__(self):
        self.calls = 0
        for name in ("all_gather", "all_reduce"):
            setattr(self, name, getattr(dist, name))
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, collective):
        def counted(*args, **kwargs):
            self.calls += 1
            return collective(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, 0
        return calls


def _run_case(rank, case, group, counter):
    """SyncBatchNorm on this rank's shard of one case, vs torch.nn.BatchNorm on the whole batch."""
    shape, sizes, options, dtype = case[:4]
    layout = case[4] if len(case) > 4 else torch.contiguous_format
    g = torch.Generator().manual_seed(hash((shape, sizes)) % 2**31)   # same data on every rank
    reference = randomize_(_torch_batchnorm(len(shape))(shape[1], **options), g).to(dtype)
    sync = SyncBatchNorm(shape[1], **options, process_group=group, dtype=dtype)
    sync.load_state_dict(reference.state_dict())
    start, stop = shard_bounds(sizes)[dist.get_rank(group)]
    diffs, collectives = {}, []
    for step in range(2):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
        x = x.contiguous(memory_format=layout)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        x_ref = x.clone().requires_grad_(True)
        y_ref = reference(x_ref)
        (y_ref * dy).sum().backward()

        x_mine = x[start:stop].clone().requires_grad_(True)
        counter.take()
        y = sync(x_mine)
        forward_calls = counter.take()
        (y * dy[start:stop]).sum().backward()
        collectives.append((forward_calls, counter.take()))

        diffs["output"] = max(diffs.get("output", 0), _max_diff(y, y_ref[start:stop]))
        if y.numel():                                    # the output's memory format, as torch's
            diffs["layout"] = float(y.stride() != y_ref[start:stop].stride())
        diffs["input gradient"] = max(diffs.get("input gradient", 0),
                                      _max_diff(x_mine.grad, x_ref.grad[start:stop]))
        for name, p in sync.named_parameters():         # local gradients sum to the global one
            total = p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # None: unused
            dist.all_reduce(total, group=group)
            counter.take()
            theirs = getattr(reference, name).grad
            theirs = theirs if theirs is not None else torch.zeros_like(p)
            diffs[f"{name} gradient"] = max(diffs.get(f"{name} gradient", 0),
                                            _max_diff(total, theirs))
        buffers = dict(reference.named_buffers())
        assert dict(sync.named_buffers()).keys() == buffers.keys()
        for name, b in sync.named_buffers():
            diffs[f"buffer {name}"] = max(diffs.get(f"buffer {name}", 0), _max_diff(b, buffers[name]))
        sync.zero_grad()
        reference.zero_grad()
    return diffs, collectives


def equivalence_worker(rank, world_size, cases):
    """Every case of CASES[world_size], then the checks that need a live group."""
    counter = _CountCollectives()
    report = {"cases": [_run_case(rank, case, dist.group.WORLD, counter) for case in cases]}

    # The two-pass merge gives the same moments as the one-round-trip Chan merge.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * world_size, 3, 5, generator=g, dtype=torch.float64) * 3 + 7
    sizes = [rank + 1 for rank in range(world_size)]
    start, stop = shard_bounds(sizes)[rank]
    counts = [size * x.shape[2] for size in sizes]               # values per channel
    mean, var = global_moments_two_pass(x[start:stop], (0, 2), counts, dist.group.WORLD)
    whole = x[:sum(sizes)]
    report["two-pass"] = max(_max_diff(mean.reshape(-1), whole.mean((0, 2))),
                             _max_diff(var.reshape(-1), whole.var((0, 2), correction=0)))

    # Evaluation communicates nothing: only rank 0 runs it; a collective would block.
    bn = randomize_(SyncBatchNorm(3, dtype=torch.float64)).eval()
    counter.take()
    if rank == 0:
        y = bn(x)
        reference = copy.deepcopy(bn)
        report["eval"] = _max_diff(y, normcode.functional.batch_norm(
            x, reference.running_mean, reference.running_var, reference.weight, reference.bias,
            False, 0.1, 1e-5))
    report["eval collectives"] = counter.take()

    # torch.nn.SyncBatchNorm cannot train on CPU.
    try:
        nn.SyncBatchNorm(3)(torch.randn(4, 3))
        report["torch"] = None
    except ValueError as e:
        report["torch"] = str(e)
    return report


def subgroup_worker(rank, world_size):
    """Ranks 0 and 1 synchronize over their own group; rank 2 is alone in a group of one."""
    counter = _CountCollectives()
    groups = [dist.new_group([0, 1]), dist.new_group([2])]   # every rank creates every group
    group = groups[0] if rank < 2 else groups[1]
    case = ((7, 3, 4), (3, 4), {}, torch.float64) if rank < 2 else ((5, 3, 4), (5,), {}, torch.float64)
    return _run_case(rank, case, group, counter)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_equals_single_process_on_concatenated_batch(world_size, record):
    results = run_workers(equivalence_worker, world_size, CASES[world_size], timeout=120)
    assert [r.error for r in results] == [None] * world_size, [r.value for r in results if r.error]
    for r in results:
        for case, (diffs, collectives) in zip(CASES[world_size], r.value["cases"]):
            record(case[3], {f"{what}, rank {r.rank} of {world_size}, shards {case[1]}": diff
                             for what, diff in diffs.items() if what != "layout"})   # the summary
            for what, diff in diffs.items():
                assert diff <= TOL[case[3]], (r.rank, case, what, diff)
            # Forward: the metadata all_gather and one all_reduce; backward: one all_reduce.
            # A batch with no element anywhere stops after the metadata.
            expected = (1, 0) if sum(case[1]) == 0 else (2, 1)
            assert collectives == [expected] * 2, (case, collectives)
        assert r.value["two-pass"] <= 1e-12
        assert r.value["eval collectives"] == 0
        assert r.value["torch"].startswith("SyncBatchNorm expected input tensor to be on GPU")
    assert results[0].value["eval"] <= 1e-15


def test_process_subgroups_and_groups_of_one():
    results = run_workers(subgroup_worker, 3, timeout=120)
    assert [r.error for r in results] == [None] * 3, [r.value for r in results if r.error]
    for r in results:
        diffs, collectives = r.value
        assert max(diffs.values()) <= 1e-12, (r.rank, diffs)
        # Rank 2's group has one member: plain BatchNorm, no communication.
        assert collectives == ([(2, 1)] * 2 if r.rank < 2 else [(0, 0)] * 2), (r.rank, collectives)


def test_spawned_workers():
    """The default start method forks workers from a server; plain spawn works as well."""
    results = run_workers(equivalence_worker, 2, CASES[2][:2], start_method="spawn", timeout=120)
    assert [r.error for r in results] == [None, None], [r.value for r in results if r.error]
    for r in results:
        for case, (diffs, _) in zip(CASES[2], r.value["cases"]):
            assert max(diffs.values()) <= TOL[case[3]], (case, diffs)


def test_ddp_follows_single_process_training():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), normcode.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 3)).double()
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    target = torch.randint(0, 3, (16,))
    results = run_workers(ddp_worker, 2, model, x, target, 5, 0.1, timeout=120)
    assert [r.error for r in results] == [None, None], [r.value for r in results if r.error]
    for r in results:
        assert max(r.value["sync"]) <= 1e-12, r.value["sync"]
        assert min(r.value["plain"]) >= 1e-4, r.value["plain"]    # unsynchronized BN drifts off


def test_torchrun_rendezvous(tmp_path):
    """The book's torchrun command: processes started by torchrun, joined through env://."""
    script = tmp_path / "check_sync.py"
    script.write_text("from normcode.distributed import torchrun_main\ntorchrun_main()\n")
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes: DDP + SyncBatchNorm followed single-process training" in done.stdout


# --------------------------------------------------------------------------------------------
# Bad input ends every worker with a clear error, never a hang
# --------------------------------------------------------------------------------------------
def bad_input_worker(rank, world_size, scenario, signal):
    """``signal``: a file that rank 0 creates once its layer has raised (the "stalls" event)."""
    torch.manual_seed(rank)
    if scenario == "channels":          # no per-channel tensors: only the exchange can tell
        bn = SyncBatchNorm(3, affine=False, track_running_stats=False)
        x = torch.randn(4, 3 + rank, 5)
    elif scenario == "one rank":        # rank 1's input does not fit its layer
        bn = SyncBatchNorm(3)
        x = torch.randn(4, 3 if rank == 0 else 5)
    elif scenario == "one value":       # one value per channel in the whole batch
        bn = SyncBatchNorm(3)
        x = torch.randn(1 if rank == 0 else 0, 3)
    elif scenario == "raises":          # rank 1 fails before it reaches the layer
        bn = SyncBatchNorm(3)
        x = torch.randn(4, 3)
        if rank == 1:
            raise RuntimeError("worker 1 failed in its own code")
    elif scenario == "stalls":          # rank 1 reaches the layer only after rank 0 gave up
        # A group whose collectives time out after 1 s; the rendezvous keeps its long timeout.
        group = dist.new_group(timeout=datetime.timedelta(seconds=1))
        bn = SyncBatchNorm(3, process_group=group)
        x = torch.randn(4, 3)
        if rank == 1:
            deadline = time.monotonic() + 60          # an event, not a race: wait for rank 0
            while not os.path.exists(signal) and time.monotonic() < deadline:
                time.sleep(0.01)
            raise RuntimeError("worker 1 was stuck elsewhere")
        try:
            bn(x)
        finally:
            open(signal, "w").close()
    y = bn(x)
    y.sum().backward()
    return "no error"


BAD_INPUT = {   # scenario: (collective timeout in s, what each rank must raise)
    "channels": (60, ["ValueError: SyncBatchNorm: every rank must feed the same number of "
                      "channels, but the ranks of the process group have [3, 4]"] * 2),
    "one rank": (60, ["RuntimeError: SyncBatchNorm: rank(s) [1] of the process group rejected",
                      "RuntimeError: sync_batch_norm: running_mean should contain 5 elements"]),
    "one value": (60, ["ValueError: Expected more than 1 value per channel when training"] * 2),
    "raises": (60, ["RuntimeError: SyncBatchNorm: exchanging input shapes with the other ranks "
                    "failed", "RuntimeError: worker 1 failed in its own code"]),
    "stalls": (60, ["RuntimeError: SyncBatchNorm: exchanging input shapes with the other ranks "
                   "failed", "RuntimeError: worker 1 was stuck elsewhere"]),
}


@pytest.mark.parametrize("scenario", list(BAD_INPUT))
def test_bad_input_fails_on_every_rank_without_hanging(scenario, tmp_path):
    """No wall-clock limit: a hang would end in run_workers' TimeoutError (after 120 s), which
    fails the message check. Every scenario but "stalls" fails well before any collective
    timeout (60 s); "stalls" times out by design on its own 1 s group, and rank 1 waits for
    rank 0's error before it raises, whatever the machine's load."""
    collective_timeout, expected = BAD_INPUT[scenario]
    results = run_workers(bad_input_worker, 2, scenario, str(tmp_path / "rank0-raised"),
                          timeout=120, collective_timeout=collective_timeout)
    for r, message in zip(results, expected):
        assert r.error is not None and r.error.startswith(message), (r.rank, r.error)


# --------------------------------------------------------------------------------------------
# One process: the torch.nn.SyncBatchNorm surface
# --------------------------------------------------------------------------------------------
def test_constructor_repr_and_state_dict_match_torch():
    ours, theirs = inspect.signature(SyncBatchNorm), inspect.signature(nn.SyncBatchNorm)
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == \
           [(p.name, p.default, p.kind) for p in theirs.parameters.values()]
    for kwargs in [{}, {"affine": False}, {"bias": False}, {"track_running_stats": False},
                   {"eps": 1e-3, "momentum": None}]:
        a, b = SyncBatchNorm(5, **kwargs), nn.SyncBatchNorm(5, **kwargs)
        assert repr(a) == repr(b)
        assert {k: (v.shape, v.dtype) for k, v in a.state_dict().items()} == \
               {k: (v.shape, v.dtype) for k, v in b.state_dict().items()}
        a.load_state_dict(b.state_dict())
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (4, 3, 2, 5), (3, 3, 2, 2, 3)])
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"track_running_stats": False}])
@pytest.mark.parametrize("train", [True, False])
def test_without_process_group_it_is_torch_batchnorm(shape, kwargs, train):
    """No process group (or a group of one): torch.nn.SyncBatchNorm falls back to batch_norm."""
    assert not dist.is_initialized()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert_matches_torch(SyncBatchNorm(3, **kwargs), nn.SyncBatchNorm(3, **kwargs), x, train=train)


@pytest.mark.parametrize("shape, message", [((3,), "expected at least 2D input (got 1D input)"),
                                            ((4, 0, 2), "number of input channels should be non-zero")])
def test_bad_rank_or_zero_channels(shape, message):
    for layer in (SyncBatchNorm(3), nn.SyncBatchNorm(3)):
        with pytest.raises(ValueError, match=re.escape(message)):
            layer(torch.randn(shape))


def test_convert_sync_batchnorm():
    process_group = object()           # stored, not used, until a forward in training
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None),
                          nn.Sequential(normcode.BatchNorm2d(4, affine=False), nn.ReLU()),
                          nn.Flatten(), nn.BatchNorm1d(4 * 36, bias=False),
                          nn.SyncBatchNorm(4 * 36)).eval()
    originals = copy.deepcopy(model)
    layers = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    assert converted is model                          # children replaced in place
    new = [m for m in converted.modules() if "BatchNorm" in type(m).__name__]
    assert [type(m) for m in new] == [SyncBatchNorm] * 4
    for old, m in zip(layers, new):
        assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == \
               (old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
        assert m.process_group is process_group and not m.training
        assert (m.bias is None) == (old.bias is None)
        for name, t in list(old.named_parameters()) + list(old.named_buffers()):
            assert getattr(m, name) is t               # shared, as torch.nn's conversion does
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(converted(x), originals(x), rtol=1e-6, atol=1e-6)
    single = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is SyncBatchNorm and single.process_group is None
    masked = normcode.MaskedBatchNorm1d(3)                 # forward(input, mask): not BatchNorm's
    assert SyncBatchNorm.convert_sync_batchnorm(masked) is masked
