"""`timm-ic` / `python -m timm_ic`: one command line, one sub-command per area of the package."""
import argparse
import importlib
from typing import List, Optional

# each module exposes `register(subparsers)`, adding sub-commands whose parsers set `func(args) -> int`
_COMMAND_MODULES = ('timm_ic.hub.cli', 'timm_ic.diagnostics.cli')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-ic', description=__doc__)
    subparsers = parser.add_subparsers(dest='command', required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
