"""Registration into timm's model registry, refusing names timm already has."""
from typing import Callable

import timm
from timm.models import register_model as _timm_register_model

__all__ = ['register_model']


def register_model(fn: Callable) -> Callable:
    """timm's `register_model`, but a name timm already knows is an error, not a silent overwrite."""
    if timm.is_model(fn.__name__) and not fn.__module__.startswith('timm_ic.'):
        raise RuntimeError(f'{fn.__name__} already names a timm model; timm_ic entrypoints need unique names')
    if timm.is_model(fn.__name__):
        from timm.models._registry import _model_to_module
        if _model_to_module.get(fn.__name__) != fn.__module__.split('.')[-1]:
            raise RuntimeError(f'{fn.__name__} already names a timm model; timm_ic entrypoints need unique names')
    return _timm_register_model(fn)
