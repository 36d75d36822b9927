"""The JSON report (every number) and the printed table (summary, per-dropout correlation/MI with the conditions
each site meets, per-layer variance shift)."""
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .._atomic import finite_json, write_json_atomic
from .correlation import NO_ATOM_TOL, ZERO_MEAN_TOL
from .run import ModelDiagnostics
from .signal import BLOCK_PROBE, LAYER_PROBE

__all__ = ['build_report', 'write_report', 'format_table']


def build_report(results: Sequence[ModelDiagnostics], settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """{'settings': ..., 'models': {label: every measured number}} with NaN replaced by null."""
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f'model labels must be unique in one report, got {labels}')
    return finite_json(dict(settings=dict(settings or {}), models={r.label: r.to_dict() for r in results}))


def write_report(report: Mapping[str, Any], path: str) -> str:
    """Write the report as JSON atomically (temporary file, then `os.replace`); returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, report)  # NaN/inf as null: strict JSON
    return path


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: '  '.join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def _g(value: Optional[float]) -> str:
    return '-' if value is None or (isinstance(value, float) and not math.isfinite(value)) else f'{value:.4g}'


def _mean(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _conditions(c) -> str:
    met = [name for name, ok in (('zero-mean', c.zero_mean), ('no atom at 0', c.no_atom_at_zero)) if ok]
    return ', '.join(met) if met else 'neither'


def _correlation_rows(corr) -> List[List[str]]:
    rows = []
    for c in corr:
        kind = f'{c.drop} keep {c.p_keep:.3g}' if c.p_keep is not None else f'{c.drop} beta {_g(c.beta)}'
        signal = c.corr_before == c.corr_before and c.corr_before > 3 * c.corr_noise_floor
        rows.append([c.layer, kind, _g(c.input_abs_mean_over_std), f'{c.input_zero_fraction:.1%}', _conditions(c),
                     _g(c.corr_before) + ('' if signal else ' (noise)'), _g(c.corr_ratio), _g(c.corr_ratio_zero_mean),
                     _g(c.corr_ratio_expected), _g(c.mi_ratio), _g(c.mi_ratio_expected)])
    return rows


def format_table(results: Sequence[ModelDiagnostics], per_layer: bool = True) -> str:
    """Summary table (one row per model), then each model's per-dropout correlation/MI with the conditions each
    site meets, and its per-norm-layer variance shift."""
    header = ['model', 'norms', 'shift mean', 'shift max', 'recal. mean', 'recal. max', 'dropouts', 'corr ratio',
              'mean-aware', 'MI ratio', 'x p_keep^2', 'conv var first/last', 'stream var first/last',
              'cos sim last', 'grad norm first/last']
    rows = []
    for r in results:
        vs, rc, sig, corr = r.variance_shift, r.variance_shift_recalibrated, r.signal, r.correlation
        convs = sig.at(LAYER_PROBE) if sig else []
        stream = sig.at(BLOCK_PROBE) if sig else []
        first, last = (convs[0], convs[-1]) if convs else (None, None)
        # layers whose correlation is well above the sampling-noise floor: elsewhere the ratio measures noise
        used = [c for c in corr if c.corr_before == c.corr_before and c.corr_before > 3 * c.corr_noise_floor]
        # MI: only the sites where p_keep^2 holds (Bernoulli dropout, input without an atom at 0)
        with_mi = [c for c in used if c.mi_ratio is not None and c.mi_ratio_expected is not None]
        rows.append([
            r.label, len(vs.layers) if vs else 0,
            _g(vs.mean_shift if vs else None), _g(vs.max_shift if vs else None),
            _g(rc.mean_shift if rc else None), _g(rc.max_shift if rc else None),
            f'{len(used)}/{len(corr)}', _g(_mean([c.corr_ratio for c in used])),
            _g(_mean([c.corr_ratio_expected for c in used])),
            _g(_mean([c.mi_ratio for c in with_mi])), _g(_mean([c.mi_ratio_expected for c in with_mi])),
            f'{_g(first.activation_variance)}/{_g(last.activation_variance)}' if first else '-',
            f'{_g(stream[0].activation_variance)}/{_g(stream[-1].activation_variance)}' if stream else '-',
            _g(last.cosine_similarity) if last else '-',
            f'{_g(first.grad_norm)}/{_g(last.grad_norm)}' if first else '-',
        ])
    parts = ['Summary (shift: mean over norm layers with running statistics of the channel-mean shift; recal.: the '
             'same after recalibration, measured on held-out batches; ratios: mean over the dropout layers whose '
             'input correlation is over 3x its sampling-noise floor, MI only over those where p_keep^2 holds; '
             'conv var: at conv outputs; stream var: at block outputs, the residual stream)',
             _table(header, rows)]
    if per_layer:
        for r in results:
            if not r.correlation:
                continue
            parts += ['', f'Correlation and MI at each dropout: {r.label} (x p_keep holds for a zero-mean input, '
                      f'|mean|/std <= {ZERO_MEAN_TOL}; x p_keep^2 for an input with no atom at 0, zeros <= '
                      f'{NO_ATOM_TOL:.0%}; the mean-aware prediction for any input; "-": condition not met)',
                      _table(['dropout', 'kind', 'input |mean|/std', 'input zeros', 'conditions met', 'corr before',
                              'corr ratio', 'x p_keep', 'mean-aware', 'MI ratio', 'x p_keep^2'],
                             _correlation_rows(r.correlation))]
        for r in results:
            if not r.variance_shift:
                continue
            recal = {layer.name: layer for layer in r.variance_shift_recalibrated.layers} \
                if r.variance_shift_recalibrated else {}
            layer_rows = [[layer.name, layer.num_channels, _g(layer.shift), _g(layer.shift_max),
                           _g(layer.real_var), _g(layer.moving_var),
                           _g(recal[layer.name].shift) if layer.name in recal else '-']
                          for layer in r.variance_shift.layers]
            title = f'Variance shift per norm layer: {r.label}'
            if r.variance_shift_recalibrated:
                title += f' (recalibrated: measured on {r.variance_shift_recalibrated.measured_on})'
            parts += ['', title,
                      _table(['norm layer', 'channels', 'shift (mean)', 'shift (max)', 'real var', 'moving var',
                              'recalibrated'], layer_rows)]
    for r in results:
        parts += [f'note ({r.label}): {note}' for note in r.notes]
    return '\n'.join(parts)
