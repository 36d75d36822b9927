"""timm-ic: IC layers, Uout and paper-faithful norm/dropout placement for timm models."""
__version__ = '0.1.0'
