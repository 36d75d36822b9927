"""Diagnostics that make each paper's claim measurable on any timm model (ours or not) and a data loader.

- `variance_shift`, `recalibrate_bn`: Li et al.'s train/test variance shift per norm layer with running statistics
  (BatchNorm, VarianceNorm2d, EvoNorm-B0) and its remedy.
- `correlation_reduction`: correlation and mutual information before/after each dropout (Chen et al.), with the
  condition each prediction needs (zero-mean input, no atom at 0) measured at each dropout.
- `signal_propagation`: activation variance, sample similarity, stable rank, gradient norm at each conv output and
  each block output, the residual stream (Lubana et al.).
- `diagnose_model`: all of them; `plots` draws them, `report` writes JSON and a table; `timm-ic diagnose` runs it all.

Every diagnostic reads a bounded number of batches, removes its hooks, restores each module's train/eval flag
and leaves parameters, their gradients and (except `recalibrate_bn`) all buffers unchanged.
"""
from ._common import running_stat_norms
from .correlation import (
    NO_ATOM_TOL, ZERO_MEAN_TOL, CorrelationResult, correlation_reduction, mean_abs_correlation, mutual_information,
    second_moment_factor,
)
from .plots import plot_correlation, plot_gradient_norm, plot_signal, plot_variance_shift
from .report import build_report, format_table, write_report
from .run import ModelDiagnostics, diagnose_model
from .signal import (
    BLOCK_PROBE, LAYER_PROBE, LayerSignal, SignalPropagation, activation_variance, block_names,
    sample_cosine_similarity, signal_propagation, stable_rank,
)
from .variance_shift import LayerShift, VarianceShift, recalibrate_bn, variance_shift

__all__ = [
    'variance_shift', 'recalibrate_bn', 'VarianceShift', 'LayerShift', 'running_stat_norms',
    'correlation_reduction', 'CorrelationResult', 'mean_abs_correlation', 'mutual_information',
    'second_moment_factor', 'ZERO_MEAN_TOL', 'NO_ATOM_TOL',
    'signal_propagation', 'SignalPropagation', 'LayerSignal', 'activation_variance', 'sample_cosine_similarity',
    'stable_rank', 'block_names', 'LAYER_PROBE', 'BLOCK_PROBE',
    'diagnose_model', 'ModelDiagnostics', 'build_report', 'write_report', 'format_table',
    'plot_variance_shift', 'plot_signal', 'plot_gradient_norm', 'plot_correlation',
]
