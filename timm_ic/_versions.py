"""Versions of the libraries a result depends on: recorded by training runs and diagnostic reports alike."""
import platform
from typing import Dict

__all__ = ['__version__', 'library_versions']

__version__ = '0.1.0'  # pyproject.toml's version; here, below every module that records it


def library_versions() -> Dict[str, str]:
    """Versions of the libraries a trained or measured result depends on."""
    import accelerate
    import timm
    import torch
    return {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'accelerate': accelerate.__version__,
        'timm_ic': __version__,
    }
