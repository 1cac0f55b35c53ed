"""The proposed speed-up of ``normcode/functional.py``, written as edits to its current text.

``normcode/functional.py`` belongs to the test suite's owner, so the proposal lives here as a list
of (old, new) edits. Each ``old`` must occur exactly once in the current file, so the proposal fails
loudly instead of drifting when the file changes. ``python benchmarks/proposal.py`` prints the
unified diff; ``python benchmarks/proposal.py --write DIR`` writes the patched copy of the package
to ``DIR/normcode``, and ``cd DIR && PYTHONPATH=DIR python -m pytest REPO/tests --rootdir REPO`` runs
the test suite on it (from DIR: run from the repository, its own normcode would come first on the
path); ``load()`` returns the patched module, ``swapped_in()`` makes normcode's modules use it.

What the edits change (same results, fewer full-size tensors; see benchmarks/README.md):

1. ``_centred_moments``: the two-pass moments also hand back ``x - mean``, which every norm needs
   next and used to recompute. The corrective second pass is subtracted in place, outside autograd:
   it is identically zero as a function of ``x`` (centred values always average to zero), so its
   derivative is zero and recording it only costs a full-size backward pass. The variance is the
   squared length of the centred values over M (``torch.linalg.vector_norm``): a reduction with no
   full-size ``(x - mean) ** 2`` in front of it, forward or backward.
2. ``_affine`` with both parameters is one ``torch.addcmul``: one full-size result, not two.
3. ``rms_norm``'s mean square is a squared length too.
"""
import argparse
import contextlib
import difflib
import importlib.util
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUNCTIONAL = ROOT / "normcode" / "functional.py"

_MOMENTS_OLD = '''    mean = x.mean(dims, keepdim=True)
    mean = mean + (x - mean).mean(dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dims, keepdim=True)
    return mean, var
'''
_MOMENTS_NEW = '''    mean, var, _ = _centred_moments(x, dims)
    return mean, var


def _centred_moments(x, dims):
    r""":func:`_moments`, and the centred values ``x - mean`` that every norm goes on to use.

    The corrective pass is subtracted in place and outside autograd: as a function of ``x`` it
    is identically zero (centred values always average to zero), so its derivative is zero, and
    recording it would only add a full-size step to the backward. The variance is the squared
    length of the centred values over M, a reduction with no full-size square in front of it.
    """
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    with torch.no_grad():
        correction = centred.mean(dims, keepdim=True)       # the first mean's rounding error
        centred -= correction
    M = math.prod(x.shape[d] for d in dims)
    var = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).square() / M
    return mean + correction, var, centred
'''

EDITS = [
    (_MOMENTS_OLD, _MOMENTS_NEW),
    # _affine: one multiply-add when both parameters are there.
    ('''    """``x_hat * weight + bias`` with both parameters viewed as ``shape`` (either may be None)."""
    if weight is not None:''',
     '''    """``x_hat * weight + bias`` with both parameters viewed as ``shape`` (either may be None).

    With both, one ``torch.addcmul``: a single full-size result instead of two."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias.to(x_hat.dtype).reshape(shape), x_hat,
                             weight.to(x_hat.dtype).reshape(shape))
    if weight is not None:'''),
    # batch_norm: the centred values come from the moments in training, from the running mean in eval.
    ('''        view, dims = statistics_view(x, "batch")
        mean, var = _moments(view, dims)''',
     '''        view, dims = statistics_view(x, "batch")
        mean, var, centred = _centred_moments(view, dims)'''),
    ('''        var = running_var.to(x.dtype).reshape(shape)

    x_hat = (x - mean) * _inverse_std(var, eps, "batch_norm")''',
     '''        var = running_var.to(x.dtype).reshape(shape)
        centred = x - mean

    x_hat = centred * _inverse_std(var, eps, "batch_norm")'''),
    # instance_norm: the same.
    ('''        mean, var = _moments(view, dims)                               # (N, C, 1, ...)''',
     '''        mean, var, centred = _centred_moments(view, dims)              # (N, C, 1, ...)'''),
    ('''        var = running_var.to(x.dtype).reshape(shape)

    if use_input_stats and eps == 0:''',
     '''        var = running_var.to(x.dtype).reshape(shape)
        centred = x - mean

    if use_input_stats and eps == 0:'''),
    ('''    x_hat = (x - mean) * inverse_std''',
     '''    x_hat = centred * inverse_std'''),
    # layer_norm and group_norm.
    ('''    mean, var = _moments(view, dims)
    x_hat = (x - mean) * _inverse_std(var, eps, "layer_norm")''',
     '''    mean, var, centred = _centred_moments(view, dims)
    x_hat = centred * _inverse_std(var, eps, "layer_norm")'''),
    ('''    mean, var = _moments(view, dims)
    x_hat = ((view - mean) * _inverse_std(var, eps, "group_norm")).reshape(input.shape)''',
     '''    mean, var, centred = _centred_moments(view, dims)
    x_hat = (centred * _inverse_std(var, eps, "group_norm")).reshape(input.shape)'''),
    # rms_norm: the mean square as a squared length.
    ('''    mean_square = (view * view).mean(dims, keepdim=True)''',
     '''    M = math.prod(view.shape[d] for d in dims)
    mean_square = torch.linalg.vector_norm(view, dim=dims, keepdim=True).square() / M'''),
]


def patched_source(source=None):
    """``normcode/functional.py``'s text with the proposal's edits applied."""
    text = FUNCTIONAL.read_text() if source is None else source
    for old, new in EDITS:
        count = text.count(old)
        if count != 1:
            raise RuntimeError(f"proposal edit no longer applies ({count} matches) to:\n{old}")
        text = text.replace(old, new)
    return text


def diff():
    old = FUNCTIONAL.read_text()
    return "".join(difflib.unified_diff(old.splitlines(True), patched_source(old).splitlines(True),
                                        "a/normcode/functional.py", "b/normcode/functional.py"))


def load(name="normcode._proposed_functional"):
    """The patched functional module, importable beside normcode's (its relative imports resolve)."""
    import normcode                                       # noqa: F401  (the parent package)
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(FUNCTIONAL))
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "normcode"
    exec(compile(patched_source(), str(FUNCTIONAL), "exec"), module.__dict__)
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def swapped_in(functional):
    """Make normcode's modules call ``functional`` (a module with functional.py's names)."""
    import normcode.modules
    saved = normcode.modules.F
    normcode.modules.F = functional
    try:
        yield
    finally:
        normcode.modules.F = saved


def write_package(directory):
    """A copy of the normcode package with the proposal applied, under ``directory/normcode``."""
    target = pathlib.Path(directory) / "normcode"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ROOT / "normcode", target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "functional.py").write_text(patched_source())
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="DIR", help="write the patched package to DIR/normcode")
    args = parser.parse_args()
    if args.write:
        print(write_package(args.write))
    else:
        sys.stdout.write(diff())
