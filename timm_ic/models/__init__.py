"""Models: the PlacedNet builder and the registered model families (importing registers them with timm)."""
from .placed import (
    DenseLayer, DenseLayerSpec, PlacedNet, ResidualBlock, ResidualSpec, Skeleton, Transition, TransitionSpec, Unit,
    build_placed_net, create_placed_model,
)
from .ic_resnet import cifar_resnet_skeleton, timm_resnet_skeleton, wide_resnet_skeleton
from .ic_densenet import densenet_bc_skeleton, timm_densenet_skeleton
