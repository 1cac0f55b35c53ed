"""Swap every torch.nn normalization layer of a model for its normcode twin, and back.

Every normalization layer is found by ``isinstance`` and either converted or refused with a
TypeError: none is silently left as it was. A layer converts when its class is exactly one
that has a twin; a subclass (which may override ``forward``), an uninitialized lazy layer
(``LazyBatchNorm2d`` before its first forward; after it, torch has turned it into a
``BatchNorm2d``, which converts) and a norm without a twin (``CrossMapLRN2d``; normcode's
``SwitchNorm*`` and ``MaskedBatchNorm1d``) are refused.

The twin carries the layer's parameters (with their ``requires_grad``: a frozen layer stays
frozen), buffers, train/eval mode and attributes, and its module hooks: the same forward,
forward-pre, backward and state_dict hook functions are registered on the twin. The handles
returned when they were registered still refer to the original layer, so ``handle.remove()``
does not remove them from the twin.
"""
import copy
import inspect

from torch import nn

from . import distributed, modules, switchable

#: torch.nn class -> normcode class, for every layer normcode mirrors.
TWINS = {getattr(nn, name): getattr(modules, name) for name in (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm")}
TWINS[nn.SyncBatchNorm] = distributed.SyncBatchNorm

#: Every normalization layer of each side, as isinstance knows it.
TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
               nn.LocalResponseNorm, nn.CrossMapLRN2d)
NORMCODE_NORMS = (modules._NormBase, modules.LayerNorm, modules.GroupNorm, modules.RMSNorm,
                  modules.LocalResponseNorm, switchable._SwitchNorm)

#: The module attributes that hold hooks, copied to the twin.
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
          "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
          "_backward_hooks", "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
          "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


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
    for name, p in layer.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(p.requires_grad)
    # Attributes changed after construction (say track_running_stats flipped off) carry over too.
    for name in ("track_running_stats", "momentum", "eps"):
        if hasattr(layer, name):
            setattr(new, name, getattr(layer, name))
    for name in _HOOKS:
        if hasattr(layer, name):
            setattr(new, name, copy.copy(getattr(layer, name)))
    new.train(layer.training)
    return new


def _convertible(layer, mapping, norms):
    """The twin class of ``layer``, None when it is not a norm; TypeError for a norm that cannot
    be converted faithfully."""
    if not isinstance(layer, norms):
        return None
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise TypeError(f"{type(layer).__name__} has uninitialized parameters: run one forward "
                        "(torch then makes it a plain layer, which converts) before converting it")
    if type(layer) in mapping:
        return mapping[type(layer)]
    bases = [b.__name__ for b in type(layer).__mro__[1:] if b in mapping]
    why = (f"it subclasses {bases[0]}, and converting it to that twin would drop what the "
           "subclass changes" if bases else "it has no twin on the other side")
    raise TypeError(f"cannot convert {type(layer).__module__}.{type(layer).__qualname__}: {why}. "
                    "Replace it by hand, or leave it out of the model you convert")


def _replace_(model, mapping, norms):
    for name, child in model.named_children():
        cls = _convertible(child, mapping, norms)
        if cls is not None:
            setattr(model, name, _twin(child, cls))
        else:
            _replace_(child, mapping, norms)
    return model


def _convert(model, mapping, norms):
    for module in model.modules():           # refuse before copying (a lazy layer cannot be)
        _convertible(module, mapping, norms)
    cls = _convertible(model, mapping, norms)
    if cls is not None:
        return _twin(model, cls)
    return _replace_(copy.deepcopy(model), mapping, norms)


def from_torch(model):
    """A copy of ``model`` with every torch.nn normalization layer replaced by its normcode twin,
    carrying the same parameters (and their ``requires_grad``), buffers, train/eval mode and
    hooks. A norm layer that has no exact twin raises TypeError (see the module's docstring)."""
    return _convert(model, TWINS, TORCH_NORMS)


def to_torch(model):
    """The reverse of :func:`from_torch`: normcode layers become torch.nn's."""
    return _convert(model, {ours: theirs for theirs, ours in TWINS.items()}, NORMCODE_NORMS)
