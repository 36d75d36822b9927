"""Models: skeletons, the PlacedNet builder, model construction with pretrained checks, the pretrained-tag
registry and the registered model families (importing registers them with timm)."""
from typing import Dict

from .skeleton import DenseLayerSpec, ResidualSpec, Skeleton, TransitionSpec, extract_skeleton
from .placed import DenseLayer, PlacedNet, ResidualBlock, Transition, Unit, build_placed_net, create_placed_model
from .pretrained import PretrainedWeightsError, build_model_with_checks, check_pretrained_source
from .factory import (
    EXPORT_PREFIXES, ModelBuildError, PlacementError, UnknownModelError, WeightsError, check_model_name, create_model,
    load_weights, takes_placement,
)
from .ic_resnet import cifar_resnet_skeleton, timm_resnet_skeleton, wide_resnet_skeleton
from .ic_densenet import densenet_bc_skeleton, timm_densenet_skeleton

# The same weight-layer skeleton's baseline of each paper-placement model (and of each pre-activation CIFAR
# ResNet), as README's zoo table names it: timm's own model for the ImageNet skeletons, the post-activation
# `cifar_resnet*` for IC on CIFAR ResNets, the pre-activation `cifar_preresnet110` for Kim's (Kim et al.'s
# baseline is pre-activation), `cifar_wrn28_10` for the WRNs. Pairs for the benchmarks and the parameter-count
# tests; a placement moves norms and dropouts, never weight layers.
BASELINES: Dict[str, str] = {
    **{f'ic_resnet{d}': f'resnet{d}' for d in (18, 34, 50, 101, 152)},
    'kim_resnet50': 'resnet50',
    'uout_densenet121': 'densenet121',
    **{f'ic_resnet{d}': f'cifar_resnet{d}' for d in (20, 56, 110, 164)},
    **{f'cifar_preresnet{d}': f'cifar_resnet{d}' for d in (20, 56, 110, 164)},
    'kim_preresnet110': 'cifar_preresnet110',
    **{f'{p}_wrn28_10': 'cifar_wrn28_10' for p in ('ic', 'kim', 'uout')},
    'uout_densenet_bc100': 'cifar_densenet_bc100',
}
