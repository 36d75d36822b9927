"""Regenerate every figure in docs/ and the numbers README.md quotes beside them, in one command:

    python docs/make_figures.py

Each figure is a function in `FIGURES` (add a study figure the same way): it runs what its caption says on CPU,
writes its PNGs into docs/ and returns the numbers it quotes; its renderer turns those numbers into the Markdown
that README.md shows between `<!-- make_figures:NAME -->` and `<!-- /make_figures:NAME -->`. The numbers also go
to docs/figures.json (with the library versions), so README and figures.json always say the same. Every write is
atomic (temporary file, then rename). `--quick` runs the smallest settings, for tests only.
"""
import argparse
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's timm_ic, not another installed copy

from timm_ic._atomic import atomic_file, write_json_atomic  # noqa: E402

SCRIPT = 'python docs/make_figures.py'
Numbers = Dict[str, Any]


class Figure:
    """A figure: `make(out, quick)` writes its PNGs into `out` and returns its numbers; `render(numbers)` is the
    Markdown shown in README.md."""

    def __init__(self, make: Callable[[Path, bool], Numbers], render: Callable[[Numbers], str]):
        self.make, self.render = make, render


FIGURES: Dict[str, Figure] = {}


def figure(render: Callable[[Numbers], str]):
    def register(make: Callable[[Path, bool], Numbers]) -> Callable[[Path, bool], Numbers]:
        FIGURES[make.__name__] = Figure(make, render)
        return make
    return register


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_file(dst) as tmp:
        tmp.write_bytes(src.read_bytes())


def _g(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:#.3g}'


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------------------------
# Placements side by side: variance shift, signal propagation, correlation (README, "Diagnostics")
# ----------------------------------------------------------------------------------------------------------------

PLACEMENTS = ['--model', 'cifar_resnet20', '--placement', 'before_bn', '--compare', 'after_bn', 'ic',
              'ic:drop=uout,beta=0.5']
PLACEMENT_FILES = ('variance_shift.png', 'signal.png', 'correlation.png')


def _model_numbers(entry: Dict[str, Any]) -> Numbers:
    """The numbers README quotes for one model of a `timm-ic diagnose` report."""
    vs, rc = entry['variance_shift']['summary'], entry['variance_shift_recalibrated']['summary']
    probes = entry['signal']['layers']
    stream = [p['activation_variance'] for p in probes if p['probe'] == 'block output']
    convs = [p['activation_variance'] for p in probes if p['probe'] == 'layer output']
    # as the printed table: dropouts whose input correlation is over 3x the sampling-noise floor
    used = [c for c in entry['correlation']
            if c['corr_before'] is not None and c['corr_before'] > 3 * c['corr_noise_floor']]
    with_mi = [c for c in used if c['mi_ratio'] is not None and c['mi_ratio_expected'] is not None]
    return dict(
        shift_mean=vs['mean_shift'], shift_max=vs['max_shift'],
        recalibrated_mean=rc['mean_shift'], recalibrated_max=rc['max_shift'],
        recalibrated_measured_on=rc['measured_on'],
        stream_var_first=stream[0] if stream else None, stream_var_last=stream[-1] if stream else None,
        conv_var_first=convs[0] if convs else None, conv_var_last=convs[-1] if convs else None,
        dropouts=len(entry['correlation']), dropouts_used=len(used),
        corr_ratio=_mean([c['corr_ratio'] for c in used]),
        corr_ratio_mean_aware=_mean([c['corr_ratio_expected'] for c in used]),
        corr_ratio_zero_mean=_mean([c['corr_ratio_zero_mean'] for c in used]),
        zero_mean_sites=sum(c['zero_mean'] for c in used),
        mi_sites=len(with_mi), mi_ratio=_mean([c['mi_ratio'] for c in with_mi]),
        mi_ratio_expected=_mean([c['mi_ratio_expected'] for c in with_mi]),
    )


def _render_placements(n: Numbers) -> str:
    models = n['models']
    settings = n['settings']
    shifts = '; '.join(f'`{label}` {_g(m["shift_mean"])} / {_g(m["shift_max"])} '
                       f'({_g(m["recalibrated_mean"])} / {_g(m["recalibrated_max"])})' for label, m in models.items())
    stream = '; '.join(f'`{label}` {_g(m["stream_var_first"])} to {_g(m["stream_var_last"])} '
                       f'(conv outputs {_g(m["conv_var_first"])} to {_g(m["conv_var_last"])})'
                       for label, m in models.items())
    corr = '; '.join(
        f'`{label}` {_g(m["corr_ratio"])} (mean-aware {_g(m["corr_ratio_mean_aware"])}'
        + (f', zero-mean {_g(m["corr_ratio_zero_mean"])} at {m["zero_mean_sites"]} zero-mean inputs'
           if m['zero_mean_sites'] else ', no zero-mean input')
        + (f'), MI {_g(m["mi_ratio"])} (p_keep^2 {_g(m["mi_ratio_expected"])}, {m["mi_sites"]} inputs with no atom '
           'at 0)' if m['mi_sites'] else ')')
        for label, m in models.items() if m['dropouts_used'])
    return f"""Made by `{SCRIPT}` (CPU; 5 to 10 minutes on 2 cores; our measurement, not a paper number), which runs

```bash
{n['command']}
```

with weights at initialisation on the {settings['data']}, {settings['batches']} batches of {settings['batch_size']} \
per diagnostic, seed {settings['seed']}.

![variance shift per norm layer for each placement, and after BN recalibration measured on held-out \
batches](docs/variance_shift.png)

Variance shift, mean / max over the norm layers (after recalibration, measured on held-out batches): {shifts}.

![activation variance, cosine similarity and stable rank at conv outputs and at block outputs (the residual \
stream)](docs/signal.png)

Activation variance from the first to the last block output (the residual stream): {stream}.

![correlation and mutual information across each dropout; each prediction drawn only where its condition \
holds](docs/correlation.png)

Correlation ratio after/before each dropout, mean over the dropouts whose input correlation is over 3x its
sampling-noise floor, with its predictions (mean-aware: any input; zero-mean: p_keep, 3/(3+beta^2) for Uout, only at
zero-mean inputs); MI ratio where p_keep^2 applies: {corr}."""


@figure(render=_render_placements)
def diagnose_placements(out: Path, quick: bool = False) -> Numbers:
    """`timm-ic diagnose` on cifar_resnet20 with four placements: variance_shift.png, signal.png, correlation.png."""
    from timm_ic.cli import main
    args = ['diagnose', *PLACEMENTS] + (['--batches', '1', '--batch-size', '16'] if quick else [])
    with tempfile.TemporaryDirectory() as tmp:
        status = main(args + ['--out', tmp])
        if status != 0:
            raise SystemExit(f'{SCRIPT}: timm-ic {shlex.join(args)} failed with exit status {status}')
        with open(Path(tmp) / 'report.json', encoding='utf-8') as f:
            report = json.load(f)
        for name in PLACEMENT_FILES:
            _copy_atomic(Path(tmp) / name, out / name)
    return dict(command='timm-ic ' + shlex.join(args + ['--out', 'diagnostics']), files=list(PLACEMENT_FILES),
                settings=report['settings'],
                models={label: _model_numbers(entry) for label, entry in report['models'].items()})


# ----------------------------------------------------------------------------------------------------------------
# The placement study on Fashion-MNIST (README, "What the papers' claims look like on real data")
# ----------------------------------------------------------------------------------------------------------------

STUDY = DOCS / 'study' / 'cpu'  # the committed results of `benchmarks/placement_study.py --preset cpu`


def _study_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('placement_study', REPO / 'benchmarks' / 'placement_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render_study(n: Numbers) -> str:
    s = n['settings']
    share = (f'{s["images_per_epoch"]:,} training images per epoch drawn from all 60,000' if s['images_per_epoch']
             else 'all 60,000 training images every epoch')
    rows = ['| paper | arm | placement | test top-1 (%), mean ± std (n) |', '|---|---|---|---|']
    for q in n['questions']:
        for arm in q['arms']:
            top1 = arm['top1']
            cell = f'{top1["mean"]:.2f} ± {top1["std"]:.2f} ({top1["n"]})' if top1['n'] > 1 else '-'
            rows.append(f'| {q["paper"]} | {arm["name"]} | `{arm["placement"]}` | {cell} |')
    counts = {v: sum(c['verdict'] == v for c in n['claims']) for v in ('held', 'contradicted', 'undecided')}
    claims = '\n'.join(f'- {c}' for c in n['claim_lines'])
    others = '\n\n'.join(f'![{Path(f).stem.replace("_", " ")}: top-1 before and after BN recalibration, and '
                           f'variance shift against top-1, every seed a point](docs/{f})'
                           for f in n['files'] if not f.endswith('/accuracy.png'))
    return f"""Measured by `{n['command']}` ({n['train_minutes']:g} minutes of training on \
{n['versions']['cpus']} CPUs; torch {n['versions']['torch']}, timm {n['versions']['timm']}), figures and this \
section by `{SCRIPT}`. Every arm is `{n['model']}` (one input channel) with the placement shown, recipe \
`{n['recipe']}` (ours), {s['epochs']} epochs, {share}, seeds 0 to {s['seeds'] - 1}, test top-1 on all 10,000 test \
images. These are short runs far from convergence: they show early training, not final accuracy. The full \
tables (gap, epochs to target, variance shift, recalibration, logit spread) are in \
[docs/study/cpu/results.md](docs/study/cpu/results.md); every number is in `results.json` beside it.

![test top-1 per arm, every seed a point, the bar its mean](docs/study/cpu/accuracy.png)

{chr(10).join(rows)}

Each claim below is one comparison, a − b with its 95% Welch interval over seeds: **held** when the interval \
excludes 0 on the claimed side, **contradicted** when it excludes 0 on the other, **undecided** when it contains 0 \
(or has no interval). Of {len(n['claims'])}: {counts['held']} held, {counts['contradicted']} contradicted, \
{counts['undecided']} undecided.

{claims}

{others}"""


@figure(render=_render_study)
def placement_study(out: Path, quick: bool = False) -> Numbers:
    """The figures of the committed `cpu` study, replotted from its results.json into `out/study/cpu/` (running
    the study itself is `benchmarks/placement_study.py`'s job: about 90 minutes)."""
    study = _study_module()
    source = STUDY / 'results.json'
    if not source.is_file():
        raise SystemExit(f'{SCRIPT}: {source} is missing: run `python benchmarks/placement_study.py --preset cpu '
                         f'--out docs/study/cpu` first')
    results = json.loads(source.read_text(encoding='utf-8'))
    target = out / 'study' / 'cpu'
    target.mkdir(parents=True, exist_ok=True)
    files = [p.relative_to(out).as_posix() for p in study.plot_results(results, target)]
    questions = [dict(name=qname, paper=q['paper'].split(' (')[0], title=q['title'],
                      arms=[dict(name=a, placement=arm['placement'], top1=arm['top1']) for a, arm in q['arms'].items()])
                 for qname, q in results['questions'].items()]
    prov = results['provenance']
    return dict(command=prov['command'], train_minutes=prov['train_minutes'], versions=prov['versions'],
                settings=results['settings'], model=results['model'], recipe=results['recipe'], files=files,
                questions=questions, claims=results['claims'],
                claim_lines=[study.claim_line(c) for c in results['claims']])


# ----------------------------------------------------------------------------------------------------------------
# README spans and the entry point
# ----------------------------------------------------------------------------------------------------------------

def _span(name: str) -> 're.Pattern[str]':
    return re.compile(rf'<!-- make_figures:{name} -->\n(.*?)\n?<!-- /make_figures:{name} -->', re.S)


def readme_span(text: str, name: str) -> Optional[str]:
    """The Markdown README.md shows for figure `name`, or None without its markers."""
    found = _span(name).search(text)
    return found.group(1) if found else None


def _check_markers(text: str, names: Sequence[str]) -> None:
    for name in names:
        if readme_span(text, name) is None:
            raise SystemExit(f'{SCRIPT}: README has no <!-- make_figures:{name} --> ... <!-- /make_figures:{name} '
                             '--> markers: add them where the figure belongs')


def update_readme(text: str, rendered: Dict[str, str]) -> str:
    _check_markers(text, list(rendered))
    for name, markdown in rendered.items():
        text = _span(name).sub(lambda _: f'<!-- make_figures:{name} -->\n{markdown}\n<!-- /make_figures:{name} -->',
                               text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', choices=sorted(FIGURES), help='these figures only (default: all)')
    parser.add_argument('--out', type=Path, default=DOCS, help='folder for the PNGs and figures.json (default: docs/)')
    parser.add_argument('--readme', type=Path, default=REPO / 'README.md', help='README to update')
    parser.add_argument('--quick', action='store_true', help='smallest settings: for tests, not for the docs')
    args = parser.parse_args(argv)
    numbers_path = args.out / 'figures.json'
    numbers: Dict[str, Numbers] = {}
    if numbers_path.is_file():
        numbers = json.loads(numbers_path.read_text(encoding='utf-8'))
    names = args.only or list(FIGURES)
    _check_markers(args.readme.read_text(encoding='utf-8'), names)  # before minutes of work, not after
    for name in names:
        numbers[name] = FIGURES[name].make(args.out, args.quick)
    text = update_readme(args.readme.read_text(encoding='utf-8'),
                         {name: FIGURES[name].render(numbers[name]) for name in numbers if name in FIGURES})
    write_json_atomic(numbers_path, numbers)
    with atomic_file(args.readme) as tmp:
        tmp.write_text(text, encoding='utf-8')
    print(f'wrote {", ".join(f for n in (args.only or FIGURES) for f in numbers[n]["files"])}, {numbers_path.name} '
          f'and {args.readme.name}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
