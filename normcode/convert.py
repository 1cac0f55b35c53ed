"""Swap every torch.nn normalization layer of a model for its normcode twin, and back."""
import copy
import inspect

from torch import nn

from . import distributed, modules

#: torch.nn class -> normcode class, for every layer normcode mirrors.
TWINS = {getattr(nn, name): getattr(modules, name) for name in (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm")}
TWINS[nn.SyncBatchNorm] = distributed.SyncBatchNorm


def _constructor_kwargs(layer, cls):
    """The constructor arguments of ``cls`` read back from ``layer``'s attributes."""
    kwargs = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype"):
            continue
        if name == "bias":                    # bias=False is visible only as a missing bias
            affine = getattr(layer, "affine", getattr(layer, "elementwise_affine", False))
            kwargs[name] = layer.bias is not None if affine else True
            continue
        if name == "track_running_stats":     # the buffers say what was constructed; the attribute
            kwargs[name] = layer.running_mean is not None    # may have been switched off since
            continue
        kwargs[name] = getattr(layer, name)
    return kwargs


def _twin(layer, cls):
    ref = layer.weight if getattr(layer, "weight", None) is not None else next(layer.buffers(), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = cls(**_constructor_kwargs(layer, cls), **factory)
    new.load_state_dict(layer.state_dict())
    # Attributes changed after construction (say track_running_stats flipped off) carry over too.
    for name in ("track_running_stats", "momentum", "eps"):
        if hasattr(layer, name):
            setattr(new, name, getattr(layer, name))
    new.train(layer.training)
    return new


def _replace_(model, mapping):
    for name, child in model.named_children():
        if type(child) in mapping:
            setattr(model, name, _twin(child, mapping[type(child)]))
        else:
            _replace_(child, mapping)
    return model


def _convert(model, mapping):
    if type(model) in mapping:
        return _twin(model, mapping[type(model)])
    return _replace_(copy.deepcopy(model), mapping)


def from_torch(model):
    """A copy of ``model`` with every torch.nn normalization layer replaced by its normcode twin,
    carrying the same parameters, buffers and train/eval mode."""
    return _convert(model, TWINS)


def to_torch(model):
    """The reverse of :func:`from_torch`: normcode layers become torch.nn's."""
    return _convert(model, {ours: theirs for theirs, ours in TWINS.items()})
