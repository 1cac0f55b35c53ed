"""Benchmarks: normcode against torch.nn and torch.compile(torch.nn), side by side, on this CPU.

    .venv/bin/python benchmarks/run.py            # speed, memory, accuracy, profile (make bench)
    .venv/bin/python benchmarks/run.py --write    # ... and write the figures into benchmarks/README.md
    .venv/bin/python benchmarks/run.py --book     # ... and time nbval over every chapter and the book build

Per layer, at a realistic shape, float32, modules in training mode, the input requiring grad:

* five implementations: torch.nn eager, torch.compile(torch.nn), normcode eager (autograd through
  normcode.functional), normcode manual (normcode.manual's hand-written backward passes) and
  torch.compile(normcode), each first checked against torch.nn (a fast wrong one fails the run);
* speed: forward and forward+backward, torch.utils.benchmark, best block of interleaved rounds,
  each as a ratio to the faster of torch.nn eager and torch.compile(torch.nn); the first
  (compiling) call's time; compiled with fullgraph=True, so a graph break fails the run;
* memory: the resident memory a forward keeps for its backward, and the peak of a
  forward+backward, each beyond what was resident before (large allocations are mmap'ed for
  this part, so that freed memory leaves the resident set);
* accuracy: the max error of the float32 output against a float64 reference (torch.nn in float64
  on a contiguous float64 copy) on inputs of std 1 and mean 0 .. 1e6, both layouts, as a
  ratio to torch.nn's error;
* where normcode eager's time goes: full-size tensors allocated, and torch.profiler's top ops.

Not part of the test suite: nothing here is collected by pytest.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import torch
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import normcode
import normcode.functional
import normcode.manual
from normcode.testing import randomize_

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
COMPILED_TARGET = 1.0       # torch.compile(normcode) over the faster torch, per layer, forward+backward
SWITCH_TARGET = 1.5         # torch.compile(SwitchNorm2d) over the faster BatchNorm2d
EAGER_TARGET = 4.0          # normcode manual over torch.nn eager, geometric mean, forward+backward
ACCURACY_TARGET = 1.0       # error over torch.nn's, every stress case


# --------------------------------------------------------------------------------------------
# The layers, at the shapes
# --------------------------------------------------------------------------------------------
RESNET = (16, 64, 56, 56)         # a ResNet stage: N, C, H, W (12.25 MiB in float32)
TRANSFORMER = (16, 512, 768)      # a Transformer block: batch, tokens, features (24 MiB)
LRN = (16, 64, 28, 28)            # AlexNet-like, for LocalResponseNorm


class Layer(NamedTuple):
    name: str
    shape: tuple
    make: Callable                # (library) -> module; library is torch.nn or normcode
    twin: bool = True             # torch.nn has the same layer (False: timed against BatchNorm2d)


LAYERS = [
    Layer("BatchNorm2d(64)", RESNET, lambda lib: lib.BatchNorm2d(64)),
    Layer("GroupNorm(32, 64)", RESNET, lambda lib: lib.GroupNorm(32, 64)),
    Layer("InstanceNorm2d(64, affine=True)", RESNET, lambda lib: lib.InstanceNorm2d(64, affine=True)),
    Layer("LayerNorm(768)", TRANSFORMER, lambda lib: lib.LayerNorm(768)),
    Layer("RMSNorm(768)", TRANSFORMER, lambda lib: lib.RMSNorm(768)),
    Layer("LocalResponseNorm(5)", LRN, lambda lib: lib.LocalResponseNorm(5)),
]
if hasattr(normcode, "SwitchNorm2d"):
    LAYERS.append(Layer("SwitchNorm2d(64)", RESNET,
                        lambda lib: (lib.SwitchNorm2d if lib is normcode else lib.BatchNorm2d)(64),
                        twin=False))


def make_pair(layer):
    """torch.nn's module with random (never default) parameters and buffers, and normcode's with
    the same state, both in training mode."""
    theirs = randomize_(layer.make(torch.nn), torch.Generator().manual_seed(0))
    ours = layer.make(normcode)
    if layer.twin:
        ours.load_state_dict(theirs.state_dict())
    else:
        randomize_(ours, torch.Generator().manual_seed(0))
    return theirs.train(), ours.train()


# --------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------
def _manual():
    """normcode's modules computing with normcode.manual's functions."""
    return normcode.manual.enabled()


class Impl(NamedTuple):
    name: str
    description: str
    torch_side: bool              # built from torch.nn's module (else normcode's)
    compiled: bool = False
    context: Callable = contextlib.nullcontext


IMPLS = {i.name: i for i in [
    Impl("torch.nn", "torch.nn eager: one fused kernel each way", True),
    Impl("torch.compile(torch.nn)", "torch.compile of the torch.nn module (inductor)", True, True),
    Impl("normcode", "normcode eager: autograd through normcode.functional (float64 inside)", False),
    Impl("manual", "normcode's modules on normcode.manual's hand-written backward passes", False,
         context=_manual),
    Impl("torch.compile(normcode)", "torch.compile of the normcode module (inductor, float64 inside)",
         False, True),
]}
TORCH_SIDE = [n for n, i in IMPLS.items() if i.torch_side]
OURS = [n for n, i in IMPLS.items() if not i.torch_side]


def instantiate(impl, theirs, ours):
    module = copy.deepcopy(theirs if impl.torch_side else ours)
    return torch.compile(module, fullgraph=True) if impl.compiled else module


def check_against_torch(layer, impl, run, theirs, x, dy):
    """Output, input gradient, parameter gradients and buffers of ``run`` against torch.nn's,
    float32, after one training step (which also compiles a compiled implementation)."""
    if not layer.twin:                       # nothing to compare with: one step, to compile
        with impl.context():
            run(x.detach().clone().requires_grad_(True)).backward(dy)
        return
    theirs = copy.deepcopy(theirs)
    xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
    with impl.context():
        y_ours = run(xs[0])
        y_ours.backward(dy)
    y_theirs = theirs(xs[1])
    y_theirs.backward(dy)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    where = f"{layer.name} {impl.name}"
    torch.testing.assert_close(y_ours, y_theirs, **tol, msg=lambda m: f"{where}: output\n{m}")
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol,
                               msg=lambda m: f"{where}: input gradient\n{m}")
    module = getattr(run, "_orig_mod", run)
    named = dict(theirs.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-3, atol=1e-2,
                                   msg=lambda m: f"{where}: gradient of {name}\n{m}")
        p.grad = None
    buffers = dict(theirs.named_buffers())
    for name, b in module.named_buffers():                  # running statistics, after one step
        torch.testing.assert_close(b, buffers[name], **tol, msg=lambda m: f"{where}: buffer {name}\n{m}")


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------
def best_time(fn, min_run_time, threads):
    """The best block mean of torch.utils.benchmark's blocked_autorange, in seconds; a call
    slower than ``min_run_time`` is timed once, as its own block. The machine is shared: other
    processes only ever add time, so the fastest block is the estimate least disturbed by them."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    once = timer.timeit(1).times[0]
    if once >= min_run_time:
        return once
    return min([once] + timer.blocked_autorange(min_run_time=min_run_time).times)


def build(layer, names):
    """{name: (callable, context)} for the implementations, each checked against torch.nn, and
    {name: seconds of its first call} for the compiled ones."""
    theirs, ours = make_pair(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(layer.shape, generator=g).requires_grad_(True)  # an activation inside a network
    dy = torch.randn(layer.shape, generator=g)
    runs, first_call = {}, {}
    for name in names:
        impl = IMPLS[name]
        if name == "manual" and not layer.twin:
            continue                                  # normcode.manual has no SwitchNorm
        run = instantiate(impl, theirs, ours)
        start = time.perf_counter()
        check_against_torch(layer, impl, run, theirs, x, dy)
        if impl.compiled:
            first_call[name] = time.perf_counter() - start
        runs[name] = (run, impl.context)
    return runs, first_call, x, dy


def time_layer(runs, x, dy, args):
    """{name: (forward s, forward+backward s)}, interleaved rounds, best of each."""
    times = {name: ([], []) for name in runs}
    for _ in range(args.rounds):
        for name, (run, context) in runs.items():
            with context():
                times[name][0].append(best_time(lambda: run(x), args.min_run_time, args.threads))
                times[name][1].append(best_time(lambda: run(x).backward(dy), args.min_run_time,
                                                args.threads))
    return {name: (min(f), min(fb)) for name, (f, fb) in times.items()}


def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _resident():
    status = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+) kB", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def memory_in_subprocess(layer, names):
    """:func:`memory` for ``layer``, in a fresh process whose allocations of 64 KiB or more are
    each their own mmap, returned to the kernel when freed: its resident set follows the live
    tensors (in this process glibc keeps freed memory in its heap, and reuses it unseen)."""
    command = [sys.executable, __file__, "--memory-of", layer.name, "--impls", ",".join(names)]
    done = subprocess.run(command, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(runs, x, dy):
    """{name: (bytes kept for the backward, peak bytes of forward+backward)}, beyond what was
    resident before the forward. Kept: resident after the forward less the output; peak: the
    kernel's high-water mark, reset before the forward (/proc/self/clear_refs)."""
    out = {}
    for name, (run, context) in runs.items():
        with context():
            run(x).backward(dy)                           # warm: nothing first-call left
            x.grad = None
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _resident()["VmRSS"]
            y = run(x)
            kept = _resident()["VmRSS"] - before - y.untyped_storage().nbytes()
            y.backward(dy)
            peak = _resident()["VmHWM"] - before
            del y
            x.grad = None
        out[name] = (max(kept, 0), peak)
    return out


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------
OFFSETS = (0.0, 1e2, 1e4, 1e6)


def layouts(shape):
    return ["contiguous", "channels_last"] if len(shape) == 4 else ["contiguous"]


def accuracy_layer(layer, runs):
    """{(layout, offset): {name: max |y - y_ref|}}, forward only, training mode."""
    theirs, _ = make_pair(layer)
    reference = copy.deepcopy(theirs).double()
    g = torch.Generator().manual_seed(2)
    errors = {}
    for layout in layouts(layer.shape):
        for offset in OFFSETS:
            x = torch.randn(layer.shape, generator=g) + offset               # std 1, mean offset
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)                   # as in the speed runs (no recompilation)
            with torch.no_grad():
                y_ref = reference(x.detach().double().contiguous())
            row = {}
            for name, (run, context) in runs.items():
                with context():
                    row[name] = (run(x).detach().double() - y_ref).abs().max().item()
            errors[(layout, offset)] = row
    return errors


def ratio(ours, theirs):
    if theirs == 0:
        return 1.0 if ours == 0 else math.inf
    return ours / theirs


# --------------------------------------------------------------------------------------------
# Where normcode eager's time goes
# --------------------------------------------------------------------------------------------
class FreshTensors(TorchDispatchMode):
    """Counts the full-size tensors the ops allocate (outputs in new memory, at least a quarter
    of the input's bytes). On this machine a new large tensor is a page fault per 4 KiB page, so
    their number and size explain most of an eager implementation's time."""

    def __init__(self, min_bytes):
        super().__init__()
        self.min_bytes, self.count, self.bytes = min_bytes, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.nbytes() >= self.min_bytes and storage.data_ptr() not in inputs:
                    self.count += 1
                    self.bytes += storage.nbytes()
        return out


def fresh_tensors(runs, x, dy):
    """{name: ((forward count, MiB), (backward count, MiB))}, for the eager implementations."""
    result = {}
    for name, (run, context) in runs.items():
        if IMPLS[name].compiled:
            continue
        with context():
            forward, backward = FreshTensors(x.nbytes // 4), FreshTensors(x.nbytes // 4)
            with forward:
                y = run(x)
            with backward:
                y.backward(dy)
        result[name] = tuple((m.count, m.bytes / 2**20) for m in (forward, backward))
    return result


def op_profile(layer, top):
    """normcode's forward+backward under torch.profiler: the ``top`` ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    _, ours = make_pair(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(layer.shape, generator=g).requires_grad_(True)
    dy = torch.randn(layer.shape, generator=g)
    ours(x).backward(dy)                                  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours(x).backward(dy)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key.removeprefix("aten::"), e.count, e.self_cpu_time_total / total) for e in events[:top]]


# --------------------------------------------------------------------------------------------
# The book
# --------------------------------------------------------------------------------------------
def time_command(command, log):
    log(f"  $ {' '.join(command)}")
    start = time.perf_counter()
    # One thread per process, as `make test` runs them: two oversubscribed workers crawl.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return seconds, done.returncode, tail[0]


def time_book(log):
    py = str(ROOT / ".venv" / "bin" / "python")
    chapters = sorted(p.name for p in (ROOT / "chapters").glob("*.ipynb"))
    nbval = [py, "-m", "pytest", "-n", "2", "--dist", "loadfile", "--nbval", "--nbval-current-env",
             "--nbval-sanitize-with", "chapters/sanitize.cfg", "-p", "no:cacheprovider", "chapters"]
    # What `make book` runs: both editions, side by side, into _build/html and _build/html/zh.
    build = [py, "i18n/editions.py", "build"]
    return [("nbval, every chapter (-n 2)", len(chapters), *time_command(nbval, log)),
            ("make book: both editions, -W -n --keep-going --all", len(chapters), *time_command(build, log))]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds):
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def mib(nbytes):
    return f"{nbytes / 2**20:.1f}"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    return (f"{model}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, Python {platform.python_version()}; {date}")


def main():
    parser = argparse.ArgumentParser(description="normcode against torch.nn: speed, memory, accuracy")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    parser.add_argument("--layers", default="", help="comma-separated name prefixes (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed block")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--book", action="store_true",
                        help="also time nbval over every chapter and the book build")
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/README.md")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)    # one layer's memory, as JSON
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    _ = torch.manual_seed(0)
    # Every compiled module's forward is one code object to dynamo, whose cache holds 8 graphs
    # per code object by default: this run compiles 14 modules, each in two memory formats. (One
    # module recompiling across training steps is tests/test_compiled.py's concern.)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    names = [n for n in args.impls.split(",") if n]
    if args.memory_of:
        layer = next(l for l in LAYERS if l.name == args.memory_of)
        runs, _, x, dy = build(layer, names)
        print(json.dumps(memory(runs, x, dy)))
        return
    layers = [l for l in LAYERS if not args.layers or any(l.name.startswith(p) for p in args.layers.split(","))]
    log = lambda message: print(message, file=sys.stderr, flush=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    header = (f"Machine: {machine()}. Threads: {args.threads}. Load average before the run: "
              f"{load_before[0]:.1f}. Command: `benchmarks/run.py {' '.join(sys.argv[1:])}`.")

    log("speed")
    built, speed, first_calls = {}, {}, {}
    for layer in layers:
        runs, first_calls[layer], x, dy = build(layer, names)
        built[layer] = (runs, x, dy)
        speed[layer] = time_layer(runs, x, dy, args)
        log(f"  {layer.name}: " + ", ".join(f"{n} {f * 1e3:.1f}/{fb * 1e3:.1f} ms"
                                             for n, (f, fb) in speed[layer].items()))
    log("memory")
    mem = {layer: memory_in_subprocess(layer, names) for layer in layers}

    sections = [header]
    verdict = []
    # Speed: one table per direction, ratios to the faster torch.
    twins = [l for l in layers if l.twin]
    ours = [n for n in names if n in OURS]
    means = {}
    for d, direction in ((1, "forward+backward"), (0, "forward")):   # speed[...][d]: (forward, both)
        rows, ratios = [], {n: [] for n in ours}
        for layer in layers:
            times = speed[layer]
            torch_times = [times[n][d] for n in TORCH_SIDE if n in times]
            best = min(torch_times)
            row = [layer.name + ("" if layer.twin else " *"), "x".join(map(str, layer.shape))]
            row += [ms(times[n][d]) if n in times else "-" for n in TORCH_SIDE if n in names]
            for n in ours:
                if n not in times:
                    row.append("-")
                    continue
                r = times[n][d] / best
                row.append(f"{ms(times[n][d])} ({r:.2f}x)")
                if layer.twin:
                    ratios[n].append(r)
            rows.append(row)
        if twins:
            rows.append(["**geometric mean**", ""] + [""] * len([n for n in TORCH_SIDE if n in names])
                        + [f"**{geomean(ratios[n]):.2f}x**" if ratios[n] else "-" for n in ours])
        means[direction] = {n: geomean(ratios[n]) for n in ours if ratios[n]}
        header_row = ["layer", "shape"] + [f"{n} ms" for n in TORCH_SIDE if n in names] + \
                     [f"{n} ms (x the faster torch)" for n in ours]
        sections.append(f"### {direction.capitalize()}\n\n" + table(header_row, rows))
    # Eager goal: manual over torch.nn eager.
    if "manual" in names and "torch.nn" in names and twins:
        eager_ratios = {n: geomean([speed[l][n][1] / speed[l]["torch.nn"][1] for l in twins])
                        for n in ("normcode", "manual") if n in names}
        verdict.append("- Eager (normcode manual within " + f"{EAGER_TARGET:g}x of torch.nn eager, "
                       "forward+backward geometric mean): " + ", ".join(
                           f"{n} {r:.2f}x" for n, r in eager_ratios.items())
                       + (" - met" if eager_ratios.get("manual", math.inf) <= EAGER_TARGET else " - missed") + ".")
    if "torch.compile(normcode)" in names:
        missed = []
        for layer in layers:
            times = speed[layer]
            best = min(times[n][1] for n in TORCH_SIDE if n in times)
            r = times["torch.compile(normcode)"][1] / best
            target = COMPILED_TARGET if layer.twin else SWITCH_TARGET
            if r > target:
                missed.append(f"{layer.name} {r:.2f}x (target {target:g}x)")
        verdict.append("- Compiled (torch.compile(normcode) at most as slow as the faster torch, "
                       "per layer, forward+backward; SwitchNorm2d within 1.5x of BatchNorm2d): "
                       + ("met on every layer" if not missed else "missed on " + ", ".join(missed)) + ".")
    sections.append("\\* no torch.nn twin: timed against torch.nn.BatchNorm2d, and left out of the "
                    "geometric means." if any(not l.twin for l in layers) else "")
    rows = [[layer.name] + [f"{first_calls[layer][n]:.1f}" for n in names if IMPLS[n].compiled and n in first_calls[layer]]
            for layer in layers]
    sections.append("First call of the compiled modules, seconds (tracing and compilation; "
                    "inductor's on-disk cache shortens a second run):\n\n"
                    + table(["layer"] + [n for n in names if IMPLS[n].compiled], rows))
    # Memory.
    rows = []
    kept_miss = []
    for layer in layers:
        row = [layer.name]
        for n in names:
            if n in mem[layer]:
                kept, peak = mem[layer][n]
                row.append(f"{mib(kept)} / {mib(peak)}")
            else:
                row.append("-")
        rows.append(row)
        if layer.twin and "manual" in mem[layer] and "torch.nn" in mem[layer]:
            if mem[layer]["manual"][0] > mem[layer]["torch.nn"][0] + 2**20:
                kept_miss.append(layer.name)
    if "manual" in names:
        verdict.append("- Memory kept for backward, normcode manual <= torch.nn (within 1 MiB): "
                       + ("met on every layer with a manual backward" if not kept_miss
                          else "missed on " + ", ".join(kept_miss)) + ".")
    sections.append("## Memory\n\nMiB kept for the backward / peak of forward+backward, beyond what "
                    "was resident before the forward (the input is resident already; the "
                    "output counts in the peak). SwitchNorm2d has no hand-written backward.\n\n"
                    + table(["layer"] + names, rows))

    if not args.no_accuracy:
        log("accuracy")
        accuracy = {layer: accuracy_layer(layer, built[layer][0]) for layer in twins}
        rows, worst = [], {n: (0.0, "-") for n in names if n != "torch.nn"}
        for layer, errors in accuracy.items():
            for (layout, offset), row in errors.items():
                cells = [layer.name, layout, f"{offset:g}", f"{row['torch.nn']:.2g}"]
                for n in worst:
                    r = ratio(row[n], row["torch.nn"])
                    cells.append(f"{row[n]:.2g} ({r:.2f})")
                    if r > worst[n][0]:
                        worst[n] = (r, f"{layer.name}, {layout}, mean {offset:g}")
                rows.append(cells)
        verdict.append(f"- Accuracy (error <= torch.nn's on every case): " + ", ".join(
            f"{n} worst {w:.2f} ({'met' if w <= ACCURACY_TARGET else 'missed'})"
            for n, (w, _) in worst.items() if n in OURS) + ".")
        sections.append("## Accuracy\n\nMax error of the float32 output against a float64 reference "
                        "(torch.nn in float64 on a contiguous float64 copy of the input); input std 1, "
                        "mean as given; (ratio to torch.nn's error).\n\n"
                        + table(["implementation", "worst ratio", "where"],
                                [[n, f"{w:.2f}", where] for n, (w, where) in worst.items()]) + "\n\n"
                        + table(["layer", "layout", "mean", "torch.nn error"]
                                + [f"{n} error" for n in worst], rows))

    if not args.no_profile:
        log("profile")
        rows = []
        for layer in layers:
            fresh = fresh_tensors(*built[layer])
            row = [layer.name]
            for n in [n for n in names if not IMPLS[n].compiled]:
                if n in fresh:
                    (fc, fm), (bc, bm) = fresh[n]
                    row.append(f"{fc} / {bc} ({fm + bm:.0f} MiB)")
                else:
                    row.append("-")
            rows.append(row)
        profiles = [[layer.name, ", ".join(f"{op} x{count} {share:.0%}" for op, count, share in op_profile(layer, 5))]
                    for layer in layers]
        sections.append("## Where the time goes\n\nFull-size tensors allocated by the eager "
                        "implementations (outputs in new memory of at least a quarter of the input's "
                        "size), forward / backward, and their total size:\n\n"
                        + table(["layer"] + [n for n in names if not IMPLS[n].compiled], rows)
                        + "\n\n" + table(["layer", "normcode eager forward+backward: op x calls, "
                                           "share of self CPU time"], profiles))

    if args.book:
        log("book")
        rows = [[what, n, f"{s:.0f}", "passed" if rc == 0 else f"failed (rc {rc}): {tail}"]
                for what, n, s, rc, tail in time_book(log)]
        sections.append("## The book\n\n" + table(["command", "notebooks", "seconds", "result"], rows))

    load_after = os.getloadavg()
    sections.insert(1, "## Verdict\n\n" + "\n".join(verdict) + "\n\n## Speed\n\nForward+backward and "
                    f"forward, float32, best of {args.rounds} interleaved rounds; each normcode time "
                    "as a ratio to the faster of torch.nn eager and torch.compile(torch.nn). Compiled "
                    "with fullgraph=True: a graph break would have failed the run.")
    sections.append(f"Run time: {time.perf_counter() - started:.0f} s. Load average after the run: "
                    f"{load_after[0]:.1f} (on {os.cpu_count()} cores, a load above "
                    f"{os.cpu_count()} means other processes shared them: every time above is "
                    "inflated then, torch.nn's too).")
    report = "\n\n".join(x for x in sections if x)
    print(report)
    if args.write:
        write_readme(report)


def write_readme(report):
    """Put ``report`` between the figure markers of benchmarks/README.md (the rest is prose)."""
    text = README.read_text() if README.exists() else ""
    begin, end = "<!-- figures: begin (written by benchmarks/run.py --write) -->", "<!-- figures: end -->"
    if begin in text and end in text:
        text = text[:text.index(begin)] + begin + "\n\n" + report + "\n\n" + text[text.index(end):]
    else:
        text = text + "\n" + begin + "\n\n" + report + "\n\n" + end + "\n"
    README.write_text(text)


if __name__ == "__main__":
    main()
