"""The package's layers (docs/architecture.md): imports flow one way, and every module imports on its own.

    base (_atomic, _versions, data) -> layers -> placement -> models -> rewriter -> training / hub / diagnostics
    -> cli

A module may import its own layer and the layers below it, never one above. The three top packages do not
import each other: what two of them share lives below both (SIBLING_EDGES lists any exception, with its reason).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / 'timm_ic'

# longest matching prefix wins; the package root (`import timm_ic`) loads layers, placement, models and rewriter
LAYERS: Dict[str, int] = {
    'timm_ic._atomic': 0, 'timm_ic._versions': 0, 'timm_ic.data': 0, 'timm_ic.run_record': 0,
    'timm_ic.layers': 1,
    'timm_ic.placement': 2,
    'timm_ic.models': 3,
    'timm_ic.rewriter': 4, 'timm_ic': 4,
    'timm_ic.training': 5, 'timm_ic.hub': 5, 'timm_ic.diagnostics': 5,
    # applications: the command line, and the training script (train.py runs it), which pushes its run via hub/
    'timm_ic.cli': 6, 'timm_ic.__main__': 6, 'timm_ic.training.train': 6,
}
TOP_PACKAGES = ('timm_ic.training', 'timm_ic.hub', 'timm_ic.diagnostics')
# (importer package, imported package) allowed between the top packages; add one only with its reason
SIBLING_EDGES: Set[Tuple[str, str]] = set()


def module_names() -> List[str]:
    names = []
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(REPO_ROOT).with_suffix('').parts
        names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
    return names


MODULES = module_names()
# importing `python -m timm_ic`'s module runs the command line: it is checked for its imports, not imported
IMPORTABLE = [m for m in MODULES if m != 'timm_ic.__main__']


def layer_of(module: str) -> Optional[str]:
    """The LAYERS key that `module` belongs to (its longest prefix), or None for a module outside timm_ic."""
    keys = [k for k in LAYERS if module == k or module.startswith(k + '.')]
    return max(keys, key=len) if keys else None


def imported_modules(module: str) -> List[Tuple[int, str]]:
    """(line, module) of every timm_ic module `module` imports, at any depth (function-level imports too)."""
    is_package = (PACKAGE.parent / module.replace('.', '/') / '__init__.py').is_file()
    path = PACKAGE.parent / (module.replace('.', '/') + ('/__init__.py' if is_package else '.py'))
    package = module if is_package else module.rpartition('.')[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                candidate = f'{base}.{alias.name}'
                found.append((node.lineno, candidate if candidate in MODULES else base))
    return [(line, name) for line, name in found if name == 'timm_ic' or name.startswith('timm_ic.')]


def _top(layer: str) -> Optional[str]:
    return next((p for p in TOP_PACKAGES if layer == p or layer.startswith(p + '.')), None)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize('module', MODULES)
def test_no_module_imports_a_higher_layer(module):
    here = layer_of(module)
    wrong = []
    for line, target in imported_modules(module):
        there = layer_of(target)
        if LAYERS[there] > LAYERS[here]:
            wrong.append(f'line {line}: {target} (layer {there}) is above {module} (layer {here})')
        elif LAYERS[here] == 5 and _top(here) and _top(there) and _top(here) != _top(there) and \
                (_top(here), _top(there)) not in SIBLING_EDGES:
            wrong.append(f'line {line}: {target}: {_top(here)} and {_top(there)} share it through a lower layer instead')
    assert wrong == []


def test_the_import_parser_sees_upward_imports():
    """The rule's own check: relative, absolute and function-level imports are all resolved."""
    imports = dict((name, line) for line, name in imported_modules('timm_ic.models.placed'))
    assert 'timm_ic.models.pretrained' in imports and 'timm_ic.placement' in imports
    assert 'timm_ic.data' in {n for _, n in imported_modules('timm_ic.diagnostics.cli')}  # inside a function
    assert layer_of('timm_ic.models.skeleton') == 'timm_ic.models' and layer_of('timm_ic') == 'timm_ic'


_IMPORT_ALONE = r'''
import importlib, json, random, sys, warnings
import timm, torch  # third-party libraries load once; every timm_ic module is imported afresh
warnings.filterwarnings('ignore', 'Overwriting')  # timm's note when the purged modules register again
modules, layers, seeds = json.loads(sys.argv[1])

def layer_of(name):
    keys = [k for k in layers if name == k or name.startswith(k + '.')]
    return max(keys, key=len)

def purge():
    for name in [n for n in sys.modules if n == 'timm_ic' or n.startswith('timm_ic.')]:
        del sys.modules[name]

failures = []
for module in modules:  # each on its own: nothing of timm_ic loaded before it
    purge()
    try:
        importlib.import_module(module)
    except Exception as e:
        failures.append(f'{module}: {type(e).__name__}: {e}')
        continue
    # it loads nothing above its own layer (the package root, imported first, loads up to the rewriter)
    limit = max(layers[layer_of(module)], layers['timm_ic'])
    above = sorted(n for n in sys.modules if n.startswith('timm_ic') and layers[layer_of(n)] > limit)
    if above:
        failures.append(f'{module} loads modules of a higher layer: {above}')
for seed in seeds:  # all of them, in shuffled orders
    purge()
    order = list(modules)
    random.Random(seed).shuffle(order)
    for module in order:
        try:
            importlib.import_module(module)
        except Exception as e:
            failures.append(f'order of seed {seed}, at {module}: {type(e).__name__}: {e}')
            break
print(json.dumps(failures))
'''


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


# Every module on its own (all of timm_ic purged before each) and in shuffled orders, in one interpreter: one
# fresh interpreter per module (45, each importing torch and timm again) repeated this check for ~4 minutes.
@pytest.mark.slow  # ~40 s of one CPU: every module's import twice over, and three orders
def test_every_module_imports_on_its_own_and_in_any_order():
    result = _run(_IMPORT_ALONE, json.dumps([IMPORTABLE, LAYERS, [0, 1, 2]]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_import_timm_ic_loads_no_export_training_or_diagnostics():
    result = _run('import sys, timm_ic; print(sorted(m for m in sys.modules if m.startswith("timm_ic")))')
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = eval(result.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith(TOP_PACKAGES)]
    assert 'timm_ic.models.tags' in loaded  # the pretrained tags are the models' own


def test_digits_and_fashion_mnist_statistics_have_one_home():
    """The recipes train with the statistics timm_ic.data gives (which the diagnostics use too)."""
    from timm_ic import data
    from timm_ic.training.recipes import load_recipe
    for recipe, (size, mean, std) in (('digits_demo', (data.DIGITS_INPUT_SIZE, data.DIGITS_MEAN, data.DIGITS_STD)),
                                      ('fashion_mnist_resnet20', (data.FASHION_MNIST_INPUT_SIZE,
                                                                  data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD))):
        values = load_recipe(recipe)
        assert (tuple(values['input_size']), tuple(values['mean']), tuple(values['std'])) == (size, mean, std)
