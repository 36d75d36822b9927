"""All diagnostics for one model in one call."""
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch.nn as nn

from ._common import is_active_dropout, running_stat_norms
from .correlation import CorrelationResult, correlation_reduction
from .signal import SignalPropagation, signal_propagation
from .variance_shift import VarianceShift, recalibrate_bn, variance_shift

__all__ = ['ModelDiagnostics', 'diagnose_model', 'DIAGNOSTIC_STEPS']

DIAGNOSTIC_STEPS = ('signal', 'correlation', 'variance_shift', 'recalibration')


@dataclass
class ModelDiagnostics:
    """Everything measured on one model; a diagnostic that does not apply is None / empty, with a note saying why."""
    label: str
    model: str = ''
    placement: Optional[str] = None
    weights: str = ''
    signal: Optional[SignalPropagation] = None
    correlation: List[CorrelationResult] = field(default_factory=list)
    variance_shift: Optional[VarianceShift] = None
    variance_shift_recalibrated: Optional[VarianceShift] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dict(
            label=self.label, model=self.model, placement=self.placement, weights=self.weights, notes=self.notes,
            variance_shift=self.variance_shift.to_dict() if self.variance_shift else None,
            variance_shift_recalibrated=(
                self.variance_shift_recalibrated.to_dict() if self.variance_shift_recalibrated else None),
            correlation=[r.to_dict() for r in self.correlation],
            signal=self.signal.to_dict() if self.signal else None,
        )


def diagnose_model(
        model: nn.Module,
        loader: Iterable,
        num_batches: int = 8,
        label: str = 'model',
        recalibrate: bool = True,
        autocast: bool = False,
        progress: Optional[Callable[[str], None]] = None,
        heldout: Optional[Iterable] = None,
) -> ModelDiagnostics:
    """Signal propagation, correlation at each active dropout, variance shift, and variance shift after BN
    recalibration (on a copy: `model` itself is left unchanged). `progress(step)` is called after each step.

    The recalibration estimates its statistics on `loader`; the shift after it is measured on `heldout` (other
    images, up to `num_batches` batches), since on the very batches it was estimated from it is 1 by construction.
    Without `heldout` it is measured on `loader` and a note says so.
    """
    result = ModelDiagnostics(label=label, placement=str(getattr(model, 'placement', None) or '') or None)
    done = progress or (lambda step: None)
    result.signal = signal_propagation(model, loader, num_batches=num_batches, autocast=autocast)
    done('signal')
    if any(is_active_dropout(m) for m in model.modules()):
        result.correlation = correlation_reduction(model, loader, num_batches=num_batches, autocast=autocast)
    else:
        result.notes.append('correlation: no active dropout layer')
    done('correlation')
    if running_stat_norms(model):
        result.variance_shift = variance_shift(model, loader, num_batches=num_batches, autocast=autocast)
        done('variance_shift')
        if recalibrate:
            recalibrated = recalibrate_bn(copy.deepcopy(model), loader, num_batches=num_batches, autocast=autocast)
            shift = variance_shift(recalibrated, heldout if heldout is not None else loader,
                                   num_batches=num_batches, autocast=autocast)
            if heldout is not None:
                shift.measured_on = 'held-out training batches (not those the recalibration was estimated from)'
            else:
                shift.measured_on = 'the batches the recalibration was estimated from (no held-out batches given)'
                result.notes.append('recalibrated shift measured on the batches it was estimated from: near 1 by '
                                    'construction; pass held-out batches for a real check')
            result.variance_shift_recalibrated = shift
        done('recalibration')
    else:
        result.notes.append('variance shift: no norm layer with running statistics (BatchNorm, VarianceNorm2d, '
                            'EvoNorm2dB0)')
        done('variance_shift')
        done('recalibration')
    return result
