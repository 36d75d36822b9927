"""Push an export folder to the Hugging Face Hub: `create_repo(exist_ok=True)`, then one `upload_folder` commit.

The folder is checked first (`verify_export`: complete safetensors of the architecture config.json builds,
all finite), so a truncated or mismatched export is never published.

The token comes from the usual places (`token=`, `$HF_TOKEN`, `hf auth login`); the endpoint from
`$HF_ENDPOINT`. A failed push raises `HubPushError` saying why (authentication, network, not found) and
never touches the local folder.
"""
from pathlib import Path
from typing import Any, Optional, Union

from .export import EXPORT_FILES, export, verify_export

__all__ = ['push', 'push_run', 'HubPushError']


class HubPushError(RuntimeError):
    """A push that failed; the message says why and how to retry. The local export is left as it was."""


def _transport_errors() -> tuple:
    # huggingface_hub 2.x talks through httpx2, 1.x through httpx; both raise TransportError subclasses
    errors = [ConnectionError, TimeoutError]
    for module in ('httpx2', 'httpx'):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _explain(err: Exception, repo_id: str, revision: Optional[str], endpoint: str, folder: Path) -> str:
    from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    keep = f'The export at {folder} is unchanged; retry with `timm-ic push {folder} {repo_id}`.'
    status = getattr(getattr(err, 'response', None), 'status_code', None)
    if isinstance(err, OfflineModeIsEnabled):
        return f'cannot push while HF_HUB_OFFLINE=1 is set: unset it. {keep}'
    if isinstance(err, RevisionNotFoundError):
        return (f'revision {revision!r} does not exist in {repo_id} on {endpoint} (HTTP 404): create the branch '
                f'first (`hf repo branch create {repo_id} {revision}`) or push without --revision. {keep}')
    if status == 401:
        return (f'authentication failed (HTTP 401) pushing to {repo_id} on {endpoint}: the token is missing, '
                f'invalid or expired. Log in with `hf auth login`, set HF_TOKEN, or pass --token. {keep}')
    if status == 403:
        return (f'permission denied (HTTP 403) pushing to {repo_id} on {endpoint}: the token cannot write to the '
                f'namespace {repo_id.split("/")[0]!r}; use a token with write access to it. {keep}')
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        return (f'not found (HTTP 404) pushing to {repo_id} on {endpoint}: the repository or namespace does not '
                f'exist or the token cannot see it; check the repo id and that you belong to the organisation. '
                f'{keep}')
    if isinstance(err, HfHubHTTPError):
        return f'the Hub at {endpoint} refused the push (HTTP {status}): {err}. {keep}'
    if isinstance(err, _transport_errors()):
        return (f'could not reach the Hub at {endpoint} ({type(err).__name__}: {err}): check the network '
                f'connection (and HF_ENDPOINT / proxy settings). {keep}')
    return f'{type(err).__name__}: {err}. {keep}'


def push(
        folder: Union[str, Path],
        repo_id: str,
        *,
        revision: Optional[str] = None,
        private: bool = False,
        create_pr: bool = False,
        token: Optional[str] = None,
        commit_message: str = 'Upload timm-ic model (safetensors weights, config.json, model card)',
        endpoint: Optional[str] = None,
):
    """Upload an export folder to `repo_id` in one commit; print and return the commit (`CommitInfo`).

    Raises:
        FileNotFoundError: the folder is not an export (lacks model.safetensors / config.json / README.md).
        ExportError: the export would not load (see `verify_export`); nothing is sent.
        ValueError: a malformed repo id.
        HubPushError: the Hub could not be reached or refused the push; the message says why.
    """
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    if repo_id.count('/') != 1:
        raise ValueError(f'repo id {repo_id!r} must be <namespace>/<name>, e.g. my-org/ic_resnet50.sgd90_in1k')
    verify_export(folder)
    from .._versions import __version__
    api = HfApi(endpoint=endpoint, token=token, library_name='timm-ic', library_version=__version__)
    endpoint = api.endpoint or constants.ENDPOINT
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_url.repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
            commit_message=commit_message,
            allow_patterns=list(EXPORT_FILES),  # only the export, never stray files
        )
    except Exception as e:
        raise HubPushError(_explain(e, repo_id, revision, endpoint, folder)) from e
    where = f'pull request {commit.pr_url}' if commit.pr_url else f'revision {revision or "main"}'
    print(f'Pushed {folder} to {repo_url} ({where}), commit {commit.oid}: {commit.commit_url}')
    return commit


def push_run(run_dir: Union[str, Path], repo_id: str, *, tag: Optional[str] = None, **push_kwargs: Any):
    """Export a train.py run folder to `<run_dir>/hub_export`, then push it (train.py --push-to-hub)."""
    folder = export(run_dir, Path(run_dir) / 'hub_export', repo_id=repo_id, tag=tag)
    return push(folder, repo_id, **push_kwargs)
