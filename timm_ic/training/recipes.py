"""Named YAML training recipes (`timm_ic/recipes/*.yaml`) for `train.py --recipe NAME`.

A recipe is a flat mapping of `train.py` option names (dashes or underscores) to values; explicitly given
command-line flags override it. Keys starting with `_` are notes (e.g. `_source`, `_unknown`) and are kept in
the run record but never applied.
"""
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List

import yaml

RECIPE_DIR = Path(__file__).resolve().parent.parent / 'recipes'


class RecipeError(ValueError):
    """A recipe name or file that cannot be used; the message lists the valid choices."""


def list_recipes() -> List[str]:
    """Names of the bundled recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob('*.yaml'))


def load_recipe(name_or_path: str, valid_keys: Iterable[str] = ()) -> Dict[str, Any]:
    """A recipe's values keyed by option destination (underscores); notes (`_...`) included as they are.

    `name_or_path` is a bundled recipe name or a path to a YAML file. Keys not in `valid_keys` (when given)
    raise `RecipeError` naming them.
    """
    path = Path(name_or_path)
    if not (path.suffix in ('.yaml', '.yml') and path.is_file()):
        path = RECIPE_DIR / f'{name_or_path}.yaml'
    if not path.is_file():
        raise RecipeError(f'unknown recipe {name_or_path!r}: use one of {", ".join(list_recipes())} '
                          f'or the path of a .yaml file.')
    with open(path, encoding='utf-8') as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise RecipeError(f'recipe {path} must be a mapping of option names to values, got {type(values).__name__}')
    recipe = {str(k).replace('-', '_'): v for k, v in values.items()}
    valid = set(valid_keys)
    if valid:
        unknown = sorted(k for k in recipe if not k.startswith('_') and k not in valid)
        if unknown:
            raise RecipeError(f'recipe {path} has unknown option(s) {", ".join(unknown)}; '
                              f'valid ones are train.py\'s options: {", ".join(sorted(valid))}')
    return recipe


def recipe_path(name_or_path: str) -> str:
    """Where a recipe was read from (for the run record)."""
    path = Path(name_or_path)
    if path.suffix in ('.yaml', '.yml') and path.is_file():
        return os.fspath(path.resolve())
    return os.fspath(RECIPE_DIR / f'{name_or_path}.yaml')
