"""`timm-ic export` and `timm-ic push`."""
import argparse
import sys
from pathlib import Path

__all__ = ['register']


def _export(args: argparse.Namespace) -> int:
    from .export import RunRecordError, export
    try:
        out = export(args.run_dir, args.out_dir or Path(args.run_dir) / 'hub_export', repo_id=args.repo_id,
                     tag=args.tag, license=args.license, overwrite=not args.no_overwrite)
    except (RunRecordError, FileExistsError, KeyError, ValueError) as e:
        print(f'timm-ic export: {e}', file=sys.stderr)
        return 2
    print(f'Exported {args.run_dir} to {out} (model.safetensors, config.json, README.md)')
    print(f"Load it with timm.create_model('local-dir:{out}', pretrained=True) after `import timm_ic`")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .cards import hub_repo_id
    from .export import EXPORT_FILES, RunRecordError, export
    from .push import HubPushError, push
    try:
        repo_id = args.repo_id or (hub_repo_id(args.tag) if args.tag else None)
        if not repo_id:
            print('timm-ic push: give a repo id (ORG/NAME) or --tag ARCH.TAG', file=sys.stderr)
            return 2
        folder = Path(args.folder)
        if not all((folder / f).is_file() for f in EXPORT_FILES):
            # a run folder: export it first, like train.py --push-to-hub
            folder = export(folder, folder / 'hub_export', repo_id=repo_id, tag=args.tag)
        push(folder, repo_id, revision=args.revision, private=args.private, create_pr=args.create_pr,
             token=args.token, commit_message=args.commit_message)
    except (HubPushError, RunRecordError, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f'timm-ic push: {e}', file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    """Add the `export` and `push` sub-commands."""
    p = subparsers.add_parser('export', help='export a train.py run as model.safetensors + config.json + model card',
                              description='Write a folder timm loads with hf-hub: / local-dir: from a run folder.')
    p.add_argument('run_dir', help='train.py output folder (run.json + best/last.safetensors)')
    p.add_argument('out_dir', nargs='?', help='export folder (default: RUN_DIR/hub_export)')
    p.add_argument('--repo-id', help='Hub repo the export is meant for (names the card)')
    p.add_argument('--tag', help='hub_cards/models.yaml name ARCH.TAG the weights are published as')
    p.add_argument('--license', help='weights license (default: the tag\'s, else apache-2.0)')
    p.add_argument('--no-overwrite', action='store_true', help='fail if OUT_DIR exists')
    p.set_defaults(func=_export)

    p = subparsers.add_parser('push', help='push an export (or a run folder, exported first) to the Hub',
                              description='Upload model.safetensors, config.json and README.md in one commit.')
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
