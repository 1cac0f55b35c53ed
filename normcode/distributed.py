r"""SyncBatchNorm: batch normalization whose statistics span every process of a group.

Data parallel training splits a batch across processes (one per GPU, usually). Plain BatchNorm
then normalizes each shard with its own statistics; SyncBatchNorm normalizes every shard with
the statistics of the whole, concatenated batch, and back-propagates through them.
``torch.nn.SyncBatchNorm`` synchronizes only accelerator tensors (CUDA, XPU, HPU or a
PrivateUse1 device; on a CPU tensor in a process group it raises ValueError, and its statistics
kernels have no CPU implementation); this one runs wherever ``torch.distributed`` does (gloo on
CPU, nccl on GPUs), with the same code.

Per training step and layer, three collectives over the process group:

1. an ``all_gather`` of each rank's metadata (input checks passed?, channels, count, dtype), so
   a bad input on one rank raises on every rank instead of leaving the others waiting;
2. one differentiable ``all_reduce`` carrying each rank's count-weighted moments, merged into the
   global mean and variance by Chan et al.'s parallel formula (:func:`global_moments`);
3. in the backward pass, the same ``all_reduce`` of the gradients, so each rank's input gradient
   is the gradient of the global loss.

The helpers at the end (:func:`run_workers`, :func:`demo_worker`) start a few local processes
joined by gloo, for the book and the tests.
"""
import copy
import datetime
import math
import multiprocessing
import os
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import _checks as check
from . import functional as F
from ._axes import statistics_set, statistics_view
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# A differentiable sum over ranks
# --------------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    r"""``all_reduce(SUM)`` whose backward is the same ``all_reduce`` of the gradients.

    Every rank's loss :math:`L_r` sees the one summed tensor :math:`s = \sum_q t_q`, so the
    gradient of the global loss :math:`\sum_r L_r` with respect to one rank's addend
    :math:`t_q` is :math:`\sum_r \partial L_r / \partial s`: a sum over ranks again.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor, group=None):
    """The sum of ``tensor`` over the ranks of ``group``, differentiable (its backward is the same sum of the gradients)."""
    return _AllReduceSum.apply(tensor, group if group is not None else dist.group.WORLD)


# --------------------------------------------------------------------------------------------
# Global moments
# --------------------------------------------------------------------------------------------
def global_moments(x, dims, counts, group):
    r"""Mean and biased variance of ``x`` over ``dims`` and over every rank: one round trip.

    Each rank reduces its shard to a count :math:`n_r`, a mean :math:`\mu_r` and a centred sum
    of squares :math:`M_r = \sum_{i \in r} (x_i - \mu_r)^2` (by
    ``normcode.functional._centred_sum_of_squares``: two passes over values shifted by one of
    the shard's own elements, as one machine's moments); one ``all_reduce`` gathers them all, and every rank
    merges them (Chan, Golub & LeVeque 1983):

    .. math:: \mu = \frac{1}{n}\sum_r n_r \mu_r, \qquad
              \sigma^2 = \frac{1}{n}\sum_r \left(M_r + n_r (\mu_r - \mu)^2\right)

    Every term is a sum of squares: no cancellation, unlike :math:`E[x^2] - E[x]^2`. ``counts``
    lists :math:`n_r` for every rank of ``group`` (a rank may have 0).
    """
    rank, world_size = dist.get_rank(group), len(counts)
    n_r = counts[rank]
    mean_r, m2_r = F._centred_sum_of_squares(x, dims, max(n_r, 1))   # (1, C, 1, ...); 0 when empty
    # An all_gather written as an all_reduce: each rank fills its own row of a zero table, so
    # the differentiable sum delivers every rank's row to every rank.
    mine = torch.stack([mean_r, m2_r])                                # (2, 1, C, 1, ...)
    rows = [mine if r == rank else torch.zeros_like(mine) for r in range(world_size)]
    table = all_reduce_sum(torch.stack(rows), group)                  # (world_size, 2, 1, C, ...)
    means, m2s = table[:, 0], table[:, 1]
    n_ranks = torch.tensor(counts, dtype=x.dtype, device=x.device).reshape(
        (world_size,) + (1,) * mean_r.dim())
    n = sum(counts)
    mean = (n_ranks * means).sum(0) / n
    var = (m2s.sum(0) + (n_ranks * (means - mean) ** 2).sum(0)) / n
    return mean, var


def global_moments_two_pass(x, dims, counts, group):
    r"""The same mean and variance as :func:`global_moments` in two round trips.

    The two-pass algorithm of one machine, spread over ranks: all_reduce the sums to get the
    global mean :math:`\mu = \frac{1}{n}\sum_i x_i`; centre every shard on it; all_reduce the
    centred sums of squares, :math:`\sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2`.
    """
    n = sum(counts)
    mean = all_reduce_sum(x.sum(dims, keepdim=True), group) / n
    centred = x - mean
    var = all_reduce_sum((centred * centred).sum(dims, keepdim=True), group) / n
    return mean, var


# --------------------------------------------------------------------------------------------
# Checks that fail on every rank together
# --------------------------------------------------------------------------------------------
def _check_local(input, running_mean, running_var, weight, bias, eps):
    """The checks of ``F.batch_norm`` and ``torch.nn.SyncBatchNorm`` that one rank can make alone."""
    check.floating(input, "sync_batch_norm")
    _check_channels(input)
    check.per_channel_tensors(input, "sync_batch_norm", running_mean, running_var, weight, bias)
    check.batch_norm_eps(eps, True, "batch_norm")


def _check_channels(input):
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")


def exchange_metadata(input, error, group):
    """All-gather (checks passed?, channels, count, dtype) from every rank; return the counts.

    Called by every rank before any statistics move, so that a rank whose input is bad, or
    shaped unlike its peers', makes every rank raise at once: a collective whose tensors differ
    in size across ranks would otherwise fail obscurely or wait until the group's timeout.
    """
    world_size = dist.get_world_size(group)
    ok = error is None
    C = input.shape[1] if input.dim() >= 2 else -1
    count = statistics_set(input, "batch").count if C > 0 else 0
    code = _DTYPES.index(input.dtype) if input.dtype in _DTYPES else -1
    mine = torch.tensor([int(ok), C, count, code], dtype=torch.int64, device=input.device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    try:
        dist.all_gather(gathered, mine, group=group)
    except Exception as e:                    # gloo and nccl raise their own types
        raise RuntimeError(
            "SyncBatchNorm: exchanging input shapes with the other ranks failed; a peer probably "
            f"raised or exited before reaching this layer ({type(e).__name__}: {e})") from e
    table = torch.stack(gathered).tolist()
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if not row[0]]
    if failed:
        raise RuntimeError(
            f"SyncBatchNorm: rank(s) {failed} of the process group rejected their input (see "
            "their error); every rank stops here rather than wait for them")
    dtype_name = lambda d: str(_DTYPES[d]) if d >= 0 else "?"
    for column, what, shown in ((1, "number of channels", lambda c: c), (3, "dtype", dtype_name)):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"SyncBatchNorm: every rank must feed the same {what}, but the ranks "
                             f"of the process group have {[shown(v) for v in values]}")
    return [row[2] for row in table]


# --------------------------------------------------------------------------------------------
# The functional and the module
# --------------------------------------------------------------------------------------------
def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, momentum=0.1,
                    eps=1e-5, process_group=None):
    r"""Batch normalization in training mode with statistics over every rank of ``process_group``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The statistics set of :func:`normcode.functional.batch_norm` (per channel, over N and every
    position), extended over the shards of all ranks: the result equals ``batch_norm`` on the
    concatenated batch, and so do the input gradient and the running statistics (updated with
    the global count, ``var * n / (n - 1)``). ``weight`` and ``bias`` gradients stay local (DDP
    averages them over ranks). Every rank of the group must call this together.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    try:
        _check_local(input, running_mean, running_var, weight, bias, eps)
        error = None
    except (ValueError, RuntimeError, NotImplementedError) as e:
        error = e
    counts = exchange_metadata(input, error, group)
    n = sum(counts)
    if n == 0:                                   # nothing anywhere to learn from
        return input.clone()
    if n == 1:                                   # one value per channel in the whole batch
        raise ValueError("Expected more than 1 value per channel when training, got 1 value per "
                         f"channel over the {len(counts)} ranks of the process group")
    shape = F._channel_shape(input)
    x = input.to(F._compute_dtype(input))
    view, dims = statistics_view(x, "batch")
    mean, var = global_moments(view, dims, counts, group)
    # The global n in Bessel's correction: what one process would compute on the whole batch.
    F._exponential_update_(running_mean, running_var, mean, var, n, momentum)
    x_hat = (x - mean) * F._inverse_std(var, eps, "sync_batch_norm")
    return F._in_layout_of(F._affine(x_hat, weight, bias, shape).to(input.dtype), input)


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization synchronized across processes, as ``torch.nn.SyncBatchNorm``.

    Ioffe & Szegedy 2015. In training, with ``torch.distributed`` initialized and more than one
    rank in ``process_group`` (default: the whole world), statistics per channel over N, every
    position and every rank's shard (:func:`normcode.distributed.sync_batch_norm`). Otherwise (evaluation, a single
    process, a group of one) it is :class:`normcode.BatchNorm1d`/``2d``/``3d`` and communicates
    nothing. Unlike torch.nn's, it also trains on CPU (gloo).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input):
        _check_channels(input)

    def _sync_group(self):
        """The group to synchronize over, or None when this call needs no communication."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None   # -1 when not a member

    def forward(self, input):
        group = self._sync_group()
        if group is None:
            return super().forward(input)        # plain BatchNorm, no communication
        # Training, synchronized: the bookkeeping of _BatchNorm.forward, then global statistics.
        running_mean, running_var, _, momentum = self._batch_norm_arguments()
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                               momentum, self.eps, group)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every BatchNorm layer of ``module`` (torch.nn's, and normcode's
        BatchNorm1d/2d/3d and SyncBatchNorm) by a normcode SyncBatchNorm sharing its parameters
        and buffers.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: children are replaced in place and
        ``module`` is returned, or a new layer when ``module`` itself is a BatchNorm. normcode
        layers with another ``forward`` (``MaskedBatchNorm1d`` takes a mask) are left alone.
        """
        output = module
        if type(module) in _CONVERTIBLE or isinstance(module, nn.modules.batchnorm._BatchNorm):
            output = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output


#: The normcode layers whose forward is plain BatchNorm's, which convert_sync_batchnorm replaces.
_CONVERTIBLE = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


# --------------------------------------------------------------------------------------------
# Local multi-process runs, for the book and the tests
# --------------------------------------------------------------------------------------------
@dataclass
class WorkerResult:
    """What one worker process of :func:`run_workers` reported."""
    rank: int
    value: object = None         # what the worker function returned
    error: str = None            # "ExceptionType: message" when it raised or never reported
    seconds: float = math.nan    # from the start of the process group to the report


def _bootstrap(fn, rank, world_size, args, init_method, out_dir, collective_timeout, backend):
    torch.set_num_threads(1)                 # world_size processes share the machine's cores
    result = WorkerResult(rank)
    start = time.monotonic()
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        result.value = fn(rank, world_size, *args)
        dist.barrier()                       # nobody closes its connections while a peer reads
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        result.value = traceback.format_exc()
    result.seconds = time.monotonic() - start
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_workers(fn, world_size, *args, timeout=120.0, collective_timeout=30.0, backend="gloo",
                start_method=None):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in one group.

    Each process joins a ``backend`` process group through a rendezvous file, with
    ``collective_timeout`` seconds as the group's timeout, and reports what ``fn`` returned or
    raised. Processes still running after ``timeout`` seconds are killed and reported as such.
    Returns one :class:`WorkerResult` per rank.

    ``fn`` must be importable: workers start from a fresh interpreter, never a fork of this
    one (which may hold threads or a CUDA context). ``start_method`` "spawn" imports torch
    afresh in every worker; "forkserver" (the default where available) imports it once in a
    server process that forks the workers, which makes every run after the first fast.
    """
    if start_method is None:
        start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = torch.multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # torch._dynamo: DistributedDataParallel imports it, seconds per worker otherwise.
        ctx.set_forkserver_preload(["torch", "torch._dynamo", "normcode.distributed"])
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        processes = [ctx.Process(target=_bootstrap, daemon=True,
                                 args=(fn, rank, world_size, args, init_method, tmp,
                                       collective_timeout, backend))
                     for rank in range(world_size)]
        for p in processes:
            p.start()
        deadline = time.monotonic() + timeout
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        results = []
        for rank, p in enumerate(processes):
            if p.is_alive():
                p.kill()
                p.join()
                results.append(WorkerResult(rank, error=f"TimeoutError: still running after {timeout} s"))
                continue
            path = os.path.join(tmp, f"rank{rank}.pt")
            if os.path.exists(path):
                results.append(torch.load(path, weights_only=False))
            else:
                results.append(WorkerResult(rank, error=f"ChildProcessError: exit code {p.exitcode}"))
    return results


def shard_bounds(sizes):
    """``[(start, stop), ...]``: the slices of a batch split into consecutive shards of ``sizes``."""
    stops = torch.tensor(sizes).cumsum(0).tolist()
    return list(zip([0] + stops[:-1], stops))


def demo_worker(rank, world_size, x, dy, sizes, state):
    """One rank of the book's demo: SyncBatchNorm on this rank's shard of ``x``.

    The rank takes rows ``shard_bounds(sizes)[rank]`` of ``x``, runs a normcode SyncBatchNorm
    loaded with ``state`` in training mode, back-propagates its shard of ``dy``, and returns the
    output, the input gradient, the local weight gradient and the running statistics. It also
    tries torch.nn.SyncBatchNorm on the same shard and returns the error that raises on CPU.
    """
    start, stop = shard_bounds(sizes)[rank]
    shard = x[start:stop].clone().requires_grad_(True)
    bn = SyncBatchNorm(x.shape[1], dtype=x.dtype)
    bn.load_state_dict(state)
    y = bn(shard)
    (y * dy[start:stop]).sum().backward()     # the loss sum(y * dy) has output gradient dy
    try:
        nn.SyncBatchNorm(x.shape[1], dtype=x.dtype)(x[start:stop])
        torch_error = None
    except Exception as e:
        torch_error = f"{type(e).__name__}: {e}"
    return {"output": y.detach(), "input_grad": shard.grad, "weight_grad": bn.weight.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var,
            "torch_error": torch_error}


def mismatch_worker(rank, world_size):
    """One rank of the book's bad-input demo: rank r feeds 3 + r channels to a SyncBatchNorm
    that has no per-channel tensors, so only the exchange of metadata can notice."""
    bn = SyncBatchNorm(3, affine=False, track_running_stats=False)
    return bn(torch.randn(4, 3 + rank, 5))


def ddp_worker(rank, world_size, model, x, target, steps, lr):
    """One rank of data-parallel training, next to the single-process run it should reproduce.

    Each rank trains two DistributedDataParallel copies of ``model`` on its equal shard of the
    batch ``(x, target)``: one with every BatchNorm converted to :class:`SyncBatchNorm`, one
    left as it is. Alongside, it trains a third copy in one process on the whole batch. After
    every SGD step it records, for both DDP copies, the largest difference of any parameter or
    buffer from the single-process copy. Returns ``{"sync": [...], "plain": [...]}``.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    start, stop = shard_bounds([len(x) // world_size] * world_size)[rank]
    model = model.to(x.device)
    ids = [x.device.index] if x.device.type == "cuda" else None      # one GPU per process
    single = copy.deepcopy(model)
    copies = {"sync": DDP(SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)), device_ids=ids),
              "plain": DDP(copy.deepcopy(model), device_ids=ids)}
    runs = [(single, x, target)] + [(m, x[start:stop], target[start:stop]) for m in copies.values()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m, _, _ in runs]
    distance = {name: [] for name in copies}
    for _ in range(steps):
        for (m, inputs, labels), opt in zip(runs, optimizers):
            loss = nn.functional.cross_entropy(m(inputs), labels)   # mean over what it sees
            opt.zero_grad()
            loss.backward()                # DDP averages gradients over ranks: the mean of all
            opt.step()
        reference = single.state_dict()
        for name, m in copies.items():
            state = m.module.state_dict()
            distance[name].append(max((state[k].double() - reference[k].double()).abs().max().item()
                                      for k in reference))
    return distance


def torchrun_main(steps=5, per_rank=8):
    """A script's entry point for ``torchrun``: the check of :func:`ddp_worker` at any scale.

    torchrun starts the processes, on one machine or many, and passes each its rank, the world
    size and the rendezvous address in environment variables, which ``init_process_group``
    reads. Every rank builds the same small model and global batch, trains with DDP and
    SyncBatchNorm on its shard, and asserts that it follows single-process training on the
    whole batch. On GPUs it uses nccl and the GPU ``LOCAL_RANK``; nothing else changes.
    """
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)                     # the same model and global batch on every rank
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(per_rank * world_size, 6, dtype=torch.float64, device=device)
    target = torch.randint(0, 3, (per_rank * world_size,), device=device)
    distance = ddp_worker(rank, world_size, model, x, target, steps, 0.1)
    assert max(distance["sync"]) <= 1e-12, distance       # the same trajectory, to rounding
    assert min(distance["plain"]) > 1e-6, distance        # per-shard statistics: another one
    if rank == 0:
        print(f"{world_size} processes: DDP + SyncBatchNorm followed single-process training "
              f"for {steps} steps; DDP + BatchNorm did not")
    dist.destroy_process_group()
