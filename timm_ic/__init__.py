"""timm-ic: IC layers, Uout and paper-faithful norm/dropout placement for timm models.

`import timm_ic` registers the models with timm: `timm.create_model('ic_resnet50', placement='ic:drop=uout,beta=0.1')`.
"""
from ._versions import __version__
from . import layers
from .placement import PRESETS, Placement
from . import models  # registers the entrypoints with timm
from .rewriter import rewrite

__all__ = ['Placement', 'PRESETS', 'rewrite', 'layers', 'models']
