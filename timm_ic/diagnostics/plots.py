"""Figures (PNG) of the diagnostics, one series per model or placement so several can be compared.

Uses matplotlib's object-oriented API (`Figure`, Agg canvas): no pyplot, no global backend switch, no display.
"""
from typing import List, Mapping, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._atomic import atomic_file
from .correlation import CorrelationResult
from .signal import BLOCK_PROBE, LAYER_PROBE, SignalPropagation
from .variance_shift import VarianceShift

__all__ = ['save_figure', 'plot_variance_shift', 'plot_signal', 'plot_gradient_norm', 'plot_correlation']


def save_figure(fig: Figure, path: str) -> str:
    """Write `fig` as PNG atomically (temporary file in the same folder, then `os.replace`); returns `path`."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110, bbox_inches='tight')
    return path


def _depth_axis(ax, what: str) -> None:
    ax.set_xlabel(f'{what} (order of execution)')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def plot_variance_shift(
        shifts: Mapping[str, VarianceShift],
        path: str,
        recalibrated: Optional[Mapping[str, VarianceShift]] = None,
) -> str:
    """Per-norm-layer variance shift, one panel per model side by side (shared y), recalibrated bars beside."""
    if not shifts:
        raise ValueError('nothing to plot: no variance-shift result given')
    labels = list(shifts)
    fig = Figure(figsize=(max(5.0, 4.2 * len(labels)), 3.8), layout='constrained')
    axes = fig.subplots(1, len(labels), sharey=True, squeeze=False)[0]
    top = max(layer.shift for vs in shifts.values() for layer in vs.layers)
    for ax, label in zip(axes, labels):
        values = [layer.shift for layer in shifts[label].layers]
        xs = list(range(len(values)))
        width = 0.4 if recalibrated and label in recalibrated else 0.8
        ax.bar([x - (width / 2 if width < 0.8 else 0) for x in xs], values, width=width, label='as trained')
        if recalibrated and label in recalibrated:
            after = [layer.shift for layer in recalibrated[label].layers]
            held_out = recalibrated[label].measured_on.startswith('held-out')
            ax.bar([x + width / 2 for x in range(len(after))], after, width=width,
                   label='recalibrated' + (' (measured on held-out batches)' if held_out else ''))
        ax.axhline(1.0, color='k', lw=0.8, ls='--')
        ax.set_title(f'{label}\nmean {shifts[label].mean_shift:.3g}, max {shifts[label].max_shift:.3g}', fontsize=9)
        _depth_axis(ax, 'norm layer')
        if top > 20:
            ax.set_yscale('log')
    axes[0].set_ylabel('variance shift max(real/moving, moving/real)')
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc='outside lower center', ncols=2, fontsize=8)
    fig.suptitle('Variance shift per norm layer with running statistics (1 = none)')
    return save_figure(fig, path)


# each probe kind its own line style, labelled in the legend: conv outputs dotted, block outputs (the residual
# stream) solid with squares; x is the probe's position in the order of execution, so both share one axis
_PROBE_STYLE = {LAYER_PROBE: dict(marker='.', ls=':', lw=1.0, suffix='conv outputs'),
                BLOCK_PROBE: dict(marker='s', ms=3, ls='-', lw=1.5, suffix='block outputs (residual stream)')}


def _signal_lines(ax, signals: Mapping[str, SignalPropagation], field: str, log: bool = False) -> None:
    for idx, (label, sig) in enumerate(signals.items()):
        for probe, style in _PROBE_STYLE.items():
            points = [(x, getattr(layer, field)) for x, layer in enumerate(sig.layers) if layer.probe == probe]
            if not points:
                continue
            xs, values = zip(*points)
            if log:  # a dead layer (exactly 0, e.g. a zero-initialised branch) has no place on a log axis: a gap
                values = [v if v is not None and v > 0 else float('nan') for v in values]
            kw = {k: v for k, v in style.items() if k != 'suffix'}
            ax.plot(xs, values, color=f'C{idx}', label=f'{label}: {style["suffix"]}', **kw)
    if log:
        ax.set_yscale('log')


def plot_signal(signals: Mapping[str, SignalPropagation], path: str) -> str:
    """Activation variance, mean cosine similarity between samples and stable rank across depth, at conv outputs
    and at block outputs (the residual stream), each labelled."""
    if not signals:
        raise ValueError('nothing to plot: no signal-propagation result given')
    fig = Figure(figsize=(14, 3.8), layout='constrained')
    axes = fig.subplots(1, 3)
    for ax, field, title in zip(axes, ('activation_variance', 'cosine_similarity', 'stable_rank'),
                                ('activation variance', 'mean cosine similarity between samples',
                                 'stable rank of the samples\' Gram')):
        _signal_lines(ax, signals, field, log=field == 'activation_variance')
        ax.set_title(title)
        _depth_axis(ax, 'probe point')
    axes[1].set_ylim(min(0.0, axes[1].get_ylim()[0]), 1.0)
    fig.legend(*axes[0].get_legend_handles_labels(), loc='outside lower center', ncols=min(4, 2 * len(signals)),
               fontsize=8)
    fig.suptitle('Signal propagation at each conv output and each block output (residual stream)')
    return save_figure(fig, path)


def plot_gradient_norm(signals: Mapping[str, SignalPropagation], path: str) -> str:
    """||dL/d(layer output)|| across depth."""
    if not signals:
        raise ValueError('nothing to plot: no signal-propagation result given')
    fig = Figure(figsize=(6.5, 3.8), layout='constrained')
    ax = fig.subplots()
    _signal_lines(ax, signals, 'grad_norm', log=True)
    ax.set_ylabel('gradient norm at the probe point')
    _depth_axis(ax, 'probe point')
    ax.legend(fontsize=8)
    ax.set_title('Gradient norm across depth (one backward pass per batch)')
    return save_figure(fig, path)


def plot_correlation(correlations: Mapping[str, Sequence[CorrelationResult]], path: str) -> str:
    """Correlation before/after each dropout, and the measured vs predicted correlation and MI ratios.

    Colours are models; markers are measurements (hollow: before dropout), lines are predictions.
    """
    correlations = {label: list(results) for label, results in correlations.items() if results}
    if not correlations:
        raise ValueError('nothing to plot: no correlation result given (the models have no active dropout)')
    fig = Figure(figsize=(14, 4.2), layout='constrained')
    ax_abs, ax_corr, ax_mi = fig.subplots(1, 3)
    nan = float('nan')
    for idx, (label, results) in enumerate(correlations.items()):
        color = f'C{idx}'
        xs: List[int] = list(range(len(results)))
        ax_abs.plot(xs, [r.corr_before for r in results], marker='o', mfc='none', ls='none', color=color)
        ax_abs.plot(xs, [r.corr_after for r in results], marker='o', ls='none', color=color, label=label)
        ax_abs.plot(xs, [r.corr_noise_floor for r in results], ls=':', lw=0.8, color=color)
        ax_corr.plot(xs, [r.corr_ratio for r in results], marker='o', ls='none', color=color)
        ax_corr.plot(xs, [r.corr_ratio_expected for r in results], ls='-', lw=1, color=color)
        ax_corr.plot(xs, [r.corr_ratio_zero_mean if r.corr_ratio_zero_mean is not None else nan for r in results],
                     marker='_', ms=10, ls=':', lw=1, color=color)
        ax_mi.plot(xs, [r.mi_ratio if r.mi_ratio is not None else nan for r in results], marker='o', ls='none',
                   color=color)
        ax_mi.plot(xs, [r.mi_ratio_expected if r.mi_ratio_expected is not None else nan for r in results],
                   marker='_', ms=10, ls='-', lw=1, color=color)
    ax_abs.set_title('mean |correlation| between units\n(o before dropout, \u25CF after, dotted: noise floor)',
                     fontsize=9)
    ax_corr.set_title('correlation ratio after/before (\u25CF measured)\n'
                      'line: predicted from the measured means\ndotted: p_keep, only at zero-mean inputs', fontsize=9)
    ax_mi.set_title('mutual information ratio after/before (\u25CF measured)\n'
                    'line: p_keep^2, only at inputs with no atom at 0\n(not after a ReLU); none for Uout', fontsize=9)
    for ax in (ax_abs, ax_corr, ax_mi):
        _depth_axis(ax, 'dropout layer')
    fig.legend(loc='outside lower center', ncols=min(4, len(correlations)), fontsize=8)
    fig.suptitle('Dropout on real activations: correlation shrinks by p_keep for a zero-mean input, mutual '
                 'information by p_keep^2 for an input with no atom at 0 (Chen et al.)', fontsize=10)
    return save_figure(fig, path)
