"""The placement rewriter: any supported CNN, with norm and dropout placed as a paper says.

`rewrite(model, placement)` takes the model's skeleton (its weight layers, `timm_ic.models.skeleton`) and
lays the placement over it with `build_placed_net`. What is kept and what is new:
- kept, the same tensors: every conv (stem, branches, shortcut projections, transitions), any channel
  attention (SE) and drop-path module, the classifier when its shape fits, the pooling layers;
- kept where they still fit: BatchNorms that stay on the same side of the same weight layer with the same
  width (e.g. `post` over a timm ResNet keeps all of them, `pre` over a timm ResNetV2 too; timm's
  BatchNormAct2d becomes a plain BatchNorm2d with the same statistics);
- new, initialised as timm does (weight 1, bias 0, fresh statistics): every other norm. A norm that moves
  to the other side of a weight layer changes width (in_channels vs out_channels), so it cannot be kept;
- dropped: a timm ResNet's stem norm-act (`bn1`, `act1`) under a pre-activation placement (`pre`, `ic`,
  `kim`): the stem conv then feeds the max pool directly and the first unit's new norm normalizes the pooled
  output, as in timm's ResNetV2, so that no unit sees two norms in a row. A DenseNet keeps its stem norm-act
  under `pre` (its own design; see `timm_ic.models.placed`).
Fine-tune after a rewrite that moved norms: the network computes a different function until then.
"""
from typing import Union

import torch
import torch.nn as nn

from .models.placed import PlacedNet, build_placed_net
from .models.skeleton import SUPPORTED_FAMILIES, _last_conv, extract_skeleton
from .placement import Placement

__all__ = ['rewrite', 'extract_skeleton', 'SUPPORTED_FAMILIES']  # the latter two re-exported from models.skeleton


def rewrite(
        model: nn.Module,
        placement: Union[Placement, str],
        zero_init_last: bool = False,
) -> PlacedNet:
    """`model` with `placement` applied to every residual branch, transition and the head.

    Returns a new PlacedNet that shares `model`'s weight layers (see the module docstring for what is kept).
    Works on the meta device. Raises ValueError for an unsupported model or a placement that cannot apply
    (the message names the supported families or the setting and the layer).
    """
    placement = Placement.parse(placement)
    skeleton, facts = extract_skeleton(model)
    stem_conv = _last_conv(skeleton.stem)
    first = [m for m in skeleton.stem.modules() if isinstance(m, nn.Conv2d)][0]
    cfg = dict(getattr(model, 'pretrained_cfg', {}) or {})
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))[1:]
    device = stem_conv.weight.device
    with torch.device(device):
        net = build_placed_net(
            skeleton, placement, num_classes=getattr(model, 'num_classes', 1000), global_pool=facts['global_pool'],
            in_chans=first.in_channels, zero_init_last=zero_init_last, feature_input_size=input_size)
    cfg.update(first_conv=facts['first_conv'], classifier='fc')
    net.pretrained_cfg = net.default_cfg = cfg
    return net
