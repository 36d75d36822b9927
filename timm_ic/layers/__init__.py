"""Layers: the IC layer, Uout, and the normalizer zoo of "Beyond BatchNorm"."""
from .dropout import DROP_KINDS, Dropout, ICLayer, Uout, create_dropout, set_dropout_redraw
from .norm import (
    CONV_KINDS, GROUPED_NORMS, NORM_KINDS, NORMS_WITH_ACT, TLU, VarianceNorm2d, create_conv, create_norm,
    resolve_groups, split_norm_act,
)
from .fold import BiasMapConv2d, ClampMin2d, bn_affine, can_fold_into, fold_bn_after_conv, fold_bn_after_relu, \
    fold_bn_before_conv, fold_bn_before_linear, is_eval_identity
