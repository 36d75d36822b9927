"""`timm-ic export` and `timm-ic push`.

Exit codes (train.py's scheme): 0 done; 2 bad input, nothing written or sent (a folder that is not a run or an
export, a run.json that does not describe its weights, non-finite weights, an output folder that is not an
earlier export, an export that would not load); 4 (push) the Hub could not be reached or refused the push,
the local export kept as it was.
"""
import argparse
import sys
from pathlib import Path

__all__ = ['register', 'EXIT_BAD_INPUT', 'EXIT_PUSH_FAILED']

EXIT_BAD_INPUT = 2
EXIT_PUSH_FAILED = 4  # as train.py --push-to-hub
_EXPORT_EXIT_CODES = 'exit codes: 0 done; 2 bad input (nothing written)'
_PUSH_EXIT_CODES = ('exit codes: 0 done; 2 bad input (nothing sent); 4 the Hub could not be reached or refused the '
                    'push (the export is kept)')


def _export(args: argparse.Namespace) -> int:
    from .export import export
    try:
        out = export(args.run_dir, args.out_dir or Path(args.run_dir) / 'hub_export', repo_id=args.repo_id,
                     tag=args.tag, license=args.license, overwrite=not args.no_overwrite)
    except (FileExistsError, KeyError, ValueError) as e:  # RunRecordError and ExportError are ValueErrors
        print(f'timm-ic export: {e}', file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f'Exported {args.run_dir} to {out} (model.safetensors, config.json, README.md)')
    print(f"Load it with timm.create_model('local-dir:{out}', pretrained=True) after `import timm_ic`")
    return 0


def _push(args: argparse.Namespace) -> int:
    from ..models.tags import hub_repo_id
    from .export import EXPORT_FILES, RUN_RECORD, export
    from .push import HubPushError, push
    try:
        repo_id = args.repo_id or (hub_repo_id(args.tag) if args.tag else None)
        if not repo_id:
            print('timm-ic push: give a repo id (ORG/NAME) or --tag ARCH.TAG', file=sys.stderr)
            return EXIT_BAD_INPUT
        folder = Path(args.folder)
        if (folder / RUN_RECORD).is_file() and not all((folder / f).is_file() for f in EXPORT_FILES):
            # a run folder: export it first, like train.py --push-to-hub
            folder = export(folder, folder / 'hub_export', repo_id=repo_id, tag=args.tag)
        push(folder, repo_id, revision=args.revision, private=args.private, create_pr=args.create_pr,
             token=args.token, commit_message=args.commit_message)
    except HubPushError as e:
        print(f'timm-ic push: {e}', file=sys.stderr)
        return EXIT_PUSH_FAILED
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f'timm-ic push: {e}', file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def register(subparsers) -> None:
    """Add the `export` and `push` sub-commands."""
    p = subparsers.add_parser('export', help='export a train.py run as model.safetensors + config.json + model card',
                              description='Write a folder timm loads with hf-hub: / local-dir: from a run folder. '
                              'An existing OUT_DIR is replaced only when it is empty or an earlier export.',
                              epilog=_EXPORT_EXIT_CODES)
    p.add_argument('run_dir', help='train.py output folder (run.json + best/last.safetensors)')
    p.add_argument('out_dir', nargs='?', help='export folder (default: RUN_DIR/hub_export)')
    p.add_argument('--repo-id', help='Hub repo the export is meant for (names the card)')
    p.add_argument('--tag', help='hub_cards/models.yaml name ARCH.TAG the weights are published as')
    p.add_argument('--license', help='weights license (default: the tag\'s, else apache-2.0)')
    p.add_argument('--no-overwrite', action='store_true',
                   help='fail if OUT_DIR exists (default: replace it when it is empty or an earlier export)')
    p.set_defaults(func=_export)

    p = subparsers.add_parser('push', help='push an export (or a run folder, exported first) to the Hub',
                              description='Upload model.safetensors, config.json and README.md in one commit, '
                              'after checking that they load (complete, finite, of the architecture config.json '
                              'names).', epilog=_PUSH_EXIT_CODES)
    p.add_argument('folder', help='export folder, or a train.py run folder (exported to FOLDER/hub_export)')
    p.add_argument('repo_id', nargs='?', help='ORG/NAME (default with --tag: the tag\'s repo in '
                                              '$TIMM_IC_HUB_NAMESPACE)')
    p.add_argument('--tag', help='hub_cards/models.yaml name ARCH.TAG these weights are')
    p.add_argument('--revision', help='branch to push to (default: main)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing to the branch')
    p.add_argument('--token', help='Hub token (default: $HF_TOKEN or the `hf auth login` token)')
    p.add_argument('--commit-message', default='Upload timm-ic model (safetensors weights, config.json, model card)')
    p.set_defaults(func=_push)
