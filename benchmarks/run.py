"""Benchmarks: normcode against torch.nn, side by side in one run, on this machine's CPU.

    .venv/bin/python benchmarks/run.py            # speed, accuracy and profile tables (about 10 min)
    .venv/bin/python benchmarks/run.py --book     # ... and the time to run every chapter and build the book
    .venv/bin/python benchmarks/run.py --write    # ... and write the figures into benchmarks/README.md

What is measured (float32 inputs, threads = 2, modules in training mode):

* speed: normcode's time over torch.nn's, forward and forward+backward, for every layer at a
  realistic shape (a ResNet stage for BN/GN/IN/LRN/SwitchNorm, a Transformer block for LN/RMS),
  with the geometric mean per direction; torch.utils.benchmark's Timer, interleaved rounds;
* accuracy: the max error of the float32 output against a float64 reference (torch.nn in float64 on
  a contiguous float64 copy of the same input), on inputs of std 1 and mean 0 .. 1e6, contiguous
  and channels_last, normcode's error over torch.nn's;
* where the time goes: the full-size tensors each direction allocates, and torch.profiler's ops;
* with --book: nbval over every chapter and the jupyter-book build, each timed via subprocess.

Each normcode variant ("normcode" is the package as it is; the others are the options measured
for reaching the speed target) is first checked against torch.nn, so a fast wrong variant fails
the run instead of winning it. Not part of the test suite: nothing here is collected by pytest.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
import types
from typing import Callable, NamedTuple

import torch
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import normcode
import normcode.functional
import normcode.manual
import normcode.switchable
from normcode.testing import randomize_

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import proposal  # noqa: E402  (benchmarks/proposal.py: the proposed functional.py)

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
SPEED_TARGET = 2.0        # geometric mean of normcode / torch.nn, forward+backward
ACCURACY_TARGET = 1.0     # normcode's max error / torch.nn's, on every stress case


# --------------------------------------------------------------------------------------------
# The layers, at realistic shapes
# --------------------------------------------------------------------------------------------
RESNET = (32, 64, 56, 56)         # a ResNet stage: N, C, H, W (25.7 MB in float32)
TRANSFORMER = (32, 512, 768)      # a Transformer block: batch, tokens, features (50 MB)


class Layer(NamedTuple):
    name: str
    shape: tuple
    make: Callable                # (library) -> module; library is torch.nn or normcode
    twin: bool = True             # torch.nn has the same layer (False: timed against BatchNorm2d)


LAYERS = [
    Layer("BatchNorm2d(64)", RESNET, lambda lib: lib.BatchNorm2d(64)),
    Layer("GroupNorm(32, 64)", RESNET, lambda lib: lib.GroupNorm(32, 64)),
    Layer("InstanceNorm2d(64, affine=True)", RESNET, lambda lib: lib.InstanceNorm2d(64, affine=True)),
    Layer("LocalResponseNorm(5)", RESNET, lambda lib: lib.LocalResponseNorm(5)),
    Layer("LayerNorm(768)", TRANSFORMER, lambda lib: lib.LayerNorm(768)),
    Layer("RMSNorm(768)", TRANSFORMER, lambda lib: lib.RMSNorm(768)),
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
# The normcode variants: the package as it is, and the options for speed
# --------------------------------------------------------------------------------------------
class Variant(NamedTuple):
    name: str
    description: str
    context: Callable             # () -> context manager under which the module computes
    compiled: bool = False        # wrap the module in torch.compile
    output_of: str = ""           # computes its output with this variant's forward (same errors)


def _swapped(functional):
    """normcode's modules (and SwitchNorm's moments) computing with ``functional``'s names."""
    @contextlib.contextmanager
    def context():
        saved = normcode.switchable._moments
        normcode.switchable._moments = getattr(functional, "_moments", saved)
        try:
            with proposal.swapped_in(functional):
                yield
        finally:
            normcode.switchable._moments = saved
    return context


def _float32_proposal():
    """The proposal computing float32 in float32: a compensated two-pass (the centred values keep
    the first mean's rounding error subtracted, as a hi + lo pair would). The variance is the mean
    of the squares, which torch sums by cascade in float32: its float32 vector_norm accumulates
    less accurately (with it, BatchNorm's error at mean 0 grew about a hundredfold)."""
    module = proposal.load("normcode._proposed_functional_float32")
    module.COMPUTE_DTYPE[torch.float32] = torch.float32
    centred_moments = module._centred_moments

    def _centred_moments(x, dims):
        mean, _, centred = centred_moments(x, dims)
        return mean, (centred * centred).mean(dims, keepdim=True), centred
    module._centred_moments = _centred_moments
    return module


_manual = types.SimpleNamespace(**{
    name: getattr(normcode.manual, name, getattr(normcode.functional, name))
    for name in ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm",
                 "local_response_norm", "_moments")})

def _proposal_variants():
    """The proposal and its float32 twin; none once the edits no longer apply to functional.py
    (adopted, or the file moved on: then proposal.py is to be updated or retired)."""
    try:
        proposed, proposed_float32 = proposal.load(), _float32_proposal()
    except RuntimeError as e:
        print(f"benchmarks/proposal.py skipped: {str(e).splitlines()[0]}", file=sys.stderr)
        return []
    return [
        Variant("proposal", "eager with benchmarks/proposal.py's edits to functional.py (float64)",
                _swapped(proposed)),
        Variant("float32", "the proposal computing float32 in float32 (compensated two-pass)",
                _swapped(proposed_float32)),
    ]


VARIANTS = {v.name: v for v in [
    Variant("normcode", "the package as it is: eager, computes float32 in float64",
            contextlib.nullcontext),
    *_proposal_variants(),
    Variant("manual", "eager with normcode.manual's hand-written backward passes (float64)",
            _swapped(_manual), output_of="normcode"),
    Variant("compiled", "torch.compile(module) of the package as it is (opt-in; float64 inside)",
            contextlib.nullcontext, compiled=True),
]}
DEFAULT_VARIANTS = [n for n in ("normcode", "proposal", "float32", "compiled") if n in VARIANTS]


def instantiate(variant, ours):
    """The callable that runs ``variant`` of normcode module ``ours`` (a copy of it)."""
    module = copy.deepcopy(ours)
    return torch.compile(module) if variant.compiled else module


# --------------------------------------------------------------------------------------------
# Correctness first: a fast wrong variant must fail the run
# --------------------------------------------------------------------------------------------
def check_against_torch(layer, variant, run, theirs, x, dy):
    """Output, input gradient, parameter gradients and buffers of ``run`` against torch.nn's,
    float32, after one training step (which also compiles a compiled variant)."""
    if not layer.twin:                       # nothing to compare with: one step, to compile
        with variant.context():
            run(x.detach().clone().requires_grad_(True)).backward(dy)
        return
    theirs = copy.deepcopy(theirs)
    xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
    with variant.context():
        y_ours = run(xs[0])
        y_ours.backward(dy)
    y_theirs = theirs(xs[1])
    y_theirs.backward(dy)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y_ours, y_theirs, **tol, msg=lambda m: f"{layer.name} {variant.name}: output\n{m}")
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol,
                               msg=lambda m: f"{layer.name} {variant.name}: input gradient\n{m}")
    module = getattr(run, "_orig_mod", run)
    named = dict(theirs.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-3, atol=1e-2,
                                   msg=lambda m: f"{layer.name} {variant.name}: gradient of {name}\n{m}")
        p.grad = None
    buffers = dict(theirs.named_buffers())
    for name, b in module.named_buffers():                  # running statistics, after one step
        torch.testing.assert_close(b, buffers[name], **tol,
                                   msg=lambda m: f"{layer.name} {variant.name}: buffer {name}\n{m}")


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------
def best_time(fn, min_run_time, threads):
    """The best block mean of torch.utils.benchmark's blocked_autorange, in seconds; a call
    slower than ``min_run_time`` is timed once, as its own block.

    The machine is shared: other processes only ever add time, so the fastest block is the
    estimate least disturbed by them."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    once = timer.timeit(1).times[0]
    if once >= min_run_time:          # a slow call is its own block: no second call to time it
        return once
    return min([once] + timer.blocked_autorange(min_run_time=min_run_time).times)


def time_layer(layer, variants, args, log):
    """{name: (forward s, forward+backward s)} for torch.nn and each variant, interleaved rounds."""
    theirs, ours = make_pair(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(layer.shape, generator=g).requires_grad_(True)   # an activation inside a network
    dy = torch.randn(layer.shape, generator=g)
    runs = {"torch.nn": (theirs, contextlib.nullcontext)}
    compile_s = {}
    for v in variants:
        run = instantiate(v, ours)
        start = time.perf_counter()
        check_against_torch(layer, v, run, theirs, x, dy)
        if v.compiled:
            compile_s[v.name] = time.perf_counter() - start
        runs[v.name] = (run, v.context)

    times = {name: ([], []) for name in runs}
    for _ in range(args.rounds):
        for name, (run, context) in runs.items():
            with context():
                times[name][0].append(best_time(lambda: run(x), args.min_run_time, args.threads))
                times[name][1].append(best_time(lambda: run(x).backward(dy), args.min_run_time,
                                                args.threads))
    result = {name: (min(f), min(fb)) for name, (f, fb) in times.items()}
    log(f"  {layer.name}: " + ", ".join(f"{n} {f * 1e3:.0f}/{fb * 1e3:.0f} ms" for n, (f, fb) in result.items()))
    return result, compile_s


def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------
OFFSETS = (0.0, 1e2, 1e4, 1e6)


def layouts(shape):
    names = ["contiguous"]
    if len(shape) == 4:
        names.append("channels_last")
    return names


def accuracy_layer(layer, variants, log):
    """{(layout, offset): {name: max |y - y_ref|}} for torch.nn float32 and each variant."""
    theirs, ours = make_pair(layer)
    reference = copy.deepcopy(theirs).double()
    selected = {v.name for v in variants}
    runs = {v.name: (instantiate(v, ours), v.context) for v in variants if v.output_of not in selected}
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
            row = {"torch.nn": (theirs(x).detach().double() - y_ref).abs().max().item()}
            for name, (run, context) in runs.items():
                with context():
                    row[name] = (run(x).detach().double() - y_ref).abs().max().item()
            for v in variants:
                if v.output_of in selected:
                    row[v.name] = row[v.output_of]
            errors[(layout, offset)] = row
    log(f"  {layer.name}: done")
    return errors


def ratio(ours, theirs):
    if theirs == 0:
        return 1.0 if ours == 0 else math.inf
    return ours / theirs


# --------------------------------------------------------------------------------------------
# Where the time goes
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


def fresh_tensors(layer, variants):
    """{name: ((forward count, MiB), (backward count, MiB))}, for the eager implementations."""
    theirs, ours = make_pair(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(layer.shape, generator=g).requires_grad_(True)
    dy = torch.randn(layer.shape, generator=g)
    runs = {"torch.nn": (theirs, contextlib.nullcontext)}
    runs.update({v.name: (copy.deepcopy(ours), v.context) for v in variants if not v.compiled})
    result = {}
    for name, (run, context) in runs.items():
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
    # Built into a scratch folder, so that a benchmark never overwrites someone's _build.
    out = f"/tmp/normcode-bench-book-{os.getpid()}"
    build = [str(ROOT / ".venv" / "bin" / "jupyter-book"), "build", ".", "-W", "-n", "--keep-going",
             "--path-output", out]
    rows = [("nbval, every chapter (-n 2)", len(chapters), *time_command(nbval, log)),
            ("jupyter-book build -W -n --keep-going", len(chapters), *time_command(build, log))]
    subprocess.run(["rm", "-rf", out])
    return rows


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds):
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def speed_tables(speed, names):
    """One table per direction: times in ms, each variant's ratio to torch.nn, geometric means."""
    out = {}
    for d, direction in enumerate(("forward", "forward+backward")):
        rows, ratios = [], {n: [] for n in names}
        for layer, (times, _) in speed.items():
            base = times["torch.nn"][d]
            row = [layer.name + ("" if layer.twin else " *"), "x".join(map(str, layer.shape)), ms(base)]
            for n in names:
                r = times[n][d] / base
                row.append(f"{ms(times[n][d])} ({r:.2f}x)")
                if layer.twin:
                    ratios[n].append(r)
            rows.append(row)
        rows.append(["**geometric mean**", "", ""] + [f"**{geomean(ratios[n]):.2f}x**" for n in names])
        out[direction] = (table(["layer", "shape", "torch.nn ms"] + [f"{n} ms (ratio)" for n in names],
                                rows), {n: geomean(ratios[n]) for n in names})
    return out


def accuracy_table(accuracy, names):
    rows, worst = [], {n: (0.0, None) for n in names}
    for layer, errors in accuracy.items():
        for (layout, offset), row in errors.items():
            cells = [layer.name, layout, f"{offset:g}", f"{row['torch.nn']:.2g}"]
            for n in names:
                r = ratio(row[n], row["torch.nn"])
                cells.append(f"{row[n]:.2g} ({r:.2f})")
                if r > worst[n][0]:
                    worst[n] = (r, f"{layer.name}, {layout}, mean {offset:g}")
            rows.append(cells)
    header = ["layer", "layout", "mean", "torch.nn error"] + [f"{n} error (ratio)" for n in names]
    return table(header, rows), worst


def fresh_table(fresh, names):
    rows = []
    for layer, result in fresh.items():
        row = [layer.name]
        for n in ["torch.nn"] + names:
            if n in result:
                (fc, fm), (bc, bm) = result[n]
                row.append(f"{fc} / {bc} ({fm + bm:.0f} MiB)")
            else:
                row.append("n/a")
        rows.append(row)
    return table(["layer"] + [f"{n}: fwd / bwd (total)" for n in ["torch.nn"] + names], rows)


def profile_table(profiles):
    rows = [[layer.name, ", ".join(f"{op} x{count} {share:.0%}" for op, count, share in ops)]
            for layer, ops in profiles.items()]
    return table(["layer", "normcode's forward+backward: op x calls, share of self CPU time"], rows)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    return (f"{model}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, Python {platform.python_version()}; {date}")


ALLOCATORS = {
    "torch's huge pages (THP_MEM_ALLOC_ENABLE=1)": {"THP_MEM_ALLOC_ENABLE": "1"},
    "glibc keeps freed memory (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=1e11)": {
        "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"},
}


def time_allocators(args, log):
    """The speed geometric means again, in subprocesses whose allocator reuses memory, so that a
    new large tensor is no longer a page fault per 4 KiB: how much of the eager cost is that."""
    rows = []
    for label, env in ALLOCATORS.items():
        log(f"  {label}")
        command = [sys.executable, __file__, "--json", "--no-accuracy", "--no-profile",
                   "--variants", args.allocator_variants, "--rounds", str(args.rounds),
                   "--min-run-time", str(args.min_run_time), "--threads", str(args.threads)]
        if args.layers:
            command += ["--layers", args.layers]
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                              check=True)
        means = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append([label] + [f"{means[n][0]:.2f}x / {means[n][1]:.2f}x"
                               for n in args.allocator_variants.split(",")])
    return rows


def main():
    parser = argparse.ArgumentParser(description="normcode against torch.nn: speed and accuracy")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}, or all "
                             "(default: all but manual)")
    parser.add_argument("--layers", default="", help="comma-separated name prefixes (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed block")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--allocators", action="store_true",
                        help="also time the eager variants under allocators that reuse memory")
    parser.add_argument("--allocator-variants",
                        default=",".join(n for n in DEFAULT_VARIANTS if not VARIANTS[n].compiled))
    parser.add_argument("--book", action="store_true",
                        help="also time nbval over every chapter and the book build")
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/README.md")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # for --allocators
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    _ = torch.manual_seed(0)
    if args.variants == "all":
        args.variants = ",".join(VARIANTS)
    variants = [VARIANTS[n] for n in args.variants.split(",") if n]
    names = [v.name for v in variants]
    layers = [l for l in LAYERS if not args.layers or any(l.name.startswith(p) for p in args.layers.split(","))]
    log = lambda message: print(message, file=sys.stderr, flush=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    header = (f"Machine: {machine()}. Threads: {args.threads}. Load average before the run: "
              f"{load_before[0]:.1f}. Command: `benchmarks/run.py {' '.join(sys.argv[1:])}`.")

    log("speed")
    speed = {layer: time_layer(layer, variants, args, log) for layer in layers}
    tables = speed_tables(speed, names)
    means = {n: (tables["forward"][1][n], tables["forward+backward"][1][n]) for n in names}
    if args.json:
        print(json.dumps(means))
        return
    compile_s = {layer.name: c for layer, (_, c) in speed.items() if c}
    summary = [[n, VARIANTS[n].description, f"{f:.2f}x", f"{fb:.2f}x",
                "met" if fb <= SPEED_TARGET else "missed"] for n, (f, fb) in means.items()]
    sections = [header]
    verdict = [f"- Speed target (forward+backward geometric mean <= {SPEED_TARGET}) met by: "
               + (", ".join(n for n in names if means[n][1] <= SPEED_TARGET) or "none") + "."]
    sections.append("## Speed\n\nTime of normcode over torch.nn's, float32, best of "
                    f"{args.rounds} interleaved rounds (each a torch.utils.benchmark block, or one "
                    "call when a call is slower than the block). Target: forward+backward geometric "
                    f"mean <= {SPEED_TARGET}.\n\n"
                    + table(["variant", "what", "forward", "forward+backward", "target"], summary))
    for direction, (text, _) in tables.items():
        sections.append(f"### {direction.capitalize()}\n\n{text}")
    if any(not l.twin for l in layers):
        sections.append("\\* no torch.nn twin: timed against torch.nn.BatchNorm2d, and left out of "
                        "the geometric means.")
    if compile_s:
        sections.append("torch.compile's first call (seconds; compilation, shorter when inductor's "
                        "on-disk cache is warm): " + ", ".join(
                            f"{layer} {c['compiled']:.0f}" for layer, c in compile_s.items()) + ".")

    if not args.no_accuracy:
        log("accuracy")
        accuracy = {layer: accuracy_layer(layer, variants, log) for layer in layers if layer.twin}
        text, worst = accuracy_table(accuracy, names)
        status = [[n, f"{worst[n][0]:.2f}", worst[n][1] or "-",
                   "met" if worst[n][0] <= ACCURACY_TARGET else "missed"] for n in names]
        verdict.append(f"- Accuracy target (error ratio <= {ACCURACY_TARGET} on every case) met by: "
                       + (", ".join(n for n in names if worst[n][0] <= ACCURACY_TARGET) or "none") + ".")
        same = [f"{v.name}'s forward is {v.output_of}'s, so are its errors"
                for v in variants if v.output_of in names]
        sections.append("## Accuracy\n\nMax error of the float32 output against a float64 reference "
                        "(torch.nn in float64 on a contiguous float64 copy of the input); input std 1, "
                        "mean as given. Ratio: the variant's error over torch.nn's. Target: ratio "
                        f"<= {ACCURACY_TARGET} on every case"
                        + "".join(f"; {line}" for line in same) + ".\n\n"
                        + table(["variant", "worst ratio", "where", "target"], status) + "\n\n" + text)

    if not args.no_profile:
        log("profile")
        fresh = {layer: fresh_tensors(layer, variants) for layer in layers}
        profiles = {layer: op_profile(layer, 5) for layer in layers}
        sections.append("## Where the time goes\n\nFull-size tensors allocated (outputs in new "
                        "memory of at least a quarter of the input's size), forward / backward, and "
                        "their total size. Compiled code allocates outside the dispatcher and is not "
                        "counted.\n\n" + fresh_table(fresh, [n for n in names if not VARIANTS[n].compiled])
                        + "\n\n" + profile_table(profiles))

    if args.allocators:
        log("allocators")
        rows = [["default (this run)"] + [f"{means[n][0]:.2f}x / {means[n][1]:.2f}x"
                                          for n in args.allocator_variants.split(",")]]
        rows += time_allocators(args, log)
        sections.append("## The same code, another allocator\n\nGeometric means, forward / "
                        "forward+backward, of the variants over torch.nn (timed under the same "
                        "allocator), when freed memory is reused instead of returned to the kernel.\n\n"
                        + table(["allocator"] + args.allocator_variants.split(","), rows))

    if args.book:
        log("book")
        rows = [[what, n, f"{s:.0f}", "passed" if rc == 0 else f"failed (rc {rc}): {tail}"]
                for what, n, s, rc, tail in time_book(log)]
        sections.append("## The book\n\n" + table(["command", "notebooks", "seconds", "result"], rows))

    load_after = os.getloadavg()
    sections.insert(1, "## Verdict\n\n" + "\n".join(verdict))
    sections.append(f"Run time: {time.perf_counter() - started:.0f} s. Load average after the run: "
                    f"{load_after[0]:.1f} (on {os.cpu_count()} cores, a load above "
                    f"{os.cpu_count()} means other processes shared them: every time above is "
                    "inflated then, torch.nn's too).")
    report = "\n\n".join(sections)
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
