"""Diagnostics that make each paper's claim measurable on any timm model (ours or not) and a data loader.

- `variance_shift`, `recalibrate_bn`: Li et al.'s train/test variance shift per BN layer and its remedy.
- `correlation_reduction`: correlation and mutual information before/after each dropout (Chen et al.).
- `signal_propagation`: activation variance, sample similarity, stable rank, gradient norm per layer (Lubana et al.).
- `diagnose_model`: all of them; `plots` draws them, `report` writes JSON and a table; `timm-ic diagnose` runs it all.

Every diagnostic reads a bounded number of batches, removes its hooks, restores each module's train/eval flag
and leaves parameters, their gradients and (except `recalibrate_bn`) all buffers unchanged.
"""
from .correlation import (
    CorrelationResult, correlation_reduction, mean_abs_correlation, mutual_information, second_moment_factor,
)
from .plots import plot_correlation, plot_gradient_norm, plot_signal, plot_variance_shift
from .report import build_report, format_table, write_report
from .run import ModelDiagnostics, diagnose_model
from .signal import (
    LayerSignal, SignalPropagation, activation_variance, sample_cosine_similarity, signal_propagation, stable_rank,
)
from .variance_shift import LayerShift, VarianceShift, recalibrate_bn, variance_shift

__all__ = [
    'variance_shift', 'recalibrate_bn', 'VarianceShift', 'LayerShift',
    'correlation_reduction', 'CorrelationResult', 'mean_abs_correlation', 'mutual_information',
    'second_moment_factor',
    'signal_propagation', 'SignalPropagation', 'LayerSignal', 'activation_variance', 'sample_cosine_similarity',
    'stable_rank',
    'diagnose_model', 'ModelDiagnostics', 'build_report', 'write_report', 'format_table',
    'plot_variance_shift', 'plot_signal', 'plot_gradient_norm', 'plot_correlation',
]
