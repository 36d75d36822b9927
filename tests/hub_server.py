"""A loopback fake of the Hugging Face Hub: the subset of its HTTP protocol that huggingface_hub uses to
create a repo, commit files (regular and LFS, Xet off) and download them back.

Endpoints (see ../shared/notes/timm-hub-accelerate.md): repo creation, YAML validation, preupload, the LFS
batch API with its upload/verify actions, NDJSON commits (also as pull requests), repo info and tree, and
HEAD/GET of `resolve/{rev}/{path}` with the headers `hf_hub_download` needs. Errors carry the Hub's
`X-Error-Code`. State lives in memory; `FakeHub.requests` records `(method, path)` of every request.

Run standalone (for a subprocess test): `python tests/hub_server.py --token T` prints its URL and serves
until killed.
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# files the fake Hub stores through LFS, like the real Hub's default .gitattributes does
_LFS_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.npz')


def _model_index_errors(model_index) -> List[str]:
    """The structure the Hub requires of `model-index` (name; results with task type, dataset type and name,
    metrics with type and value)."""
    if model_index is None:
        return []
    if not isinstance(model_index, list):
        return ['model-index must be a list']
    errors = []
    for entry in model_index:
        if not isinstance(entry, dict) or not entry.get('name'):
            errors.append('model-index entries need a name')
            continue
        for result in entry.get('results') or []:
            task, dataset = result.get('task') or {}, result.get('dataset') or {}
            if not task.get('type'):
                errors.append('model-index result without task.type')
            if not dataset.get('type') or not dataset.get('name'):
                errors.append('model-index result without dataset.type and dataset.name')
            for metric in result.get('metrics') or []:
                if not metric.get('type') or not isinstance(metric.get('value'), (int, float)):
                    errors.append('model-index metric without type or numeric value')
    return errors


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        self.commits: Dict[str, Dict[str, dict]] = {}  # sha -> {path: {'data', 'lfs'}}
        self.refs: Dict[str, str] = {}
        self.num_prs = 0
        sha = self._new_sha('initial')
        self.commits[sha] = {'.gitattributes': {'data': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n',
                                                'lfs': None}}
        self.refs['main'] = sha

    def _new_sha(self, salt: str) -> str:
        return hashlib.sha1(f'{self.repo_id}/{len(self.commits)}/{salt}'.encode()).hexdigest()

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """An in-memory Hub served on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, token: Optional[str] = 'hf_fake_token'):
        self.token = token  # None: any request is accepted; else writes need `Authorization: Bearer <token>`
        self.repos: Dict[str, _Repo] = {}
        self.lfs_objects: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> 'FakeHub':
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> 'FakeHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        """The files of a repo at a revision (for assertions in tests)."""
        repo = self.repos[repo_id]
        tree = repo.commits[repo.resolve(revision)]
        return {p: (self.lfs_objects[f['lfs']] if f['lfs'] else f['data']) for p, f in tree.items()}


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = 'HTTP/1.1'

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass

    # ---- helpers
    def _body(self) -> bytes:
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _send(self, status: int, body: bytes = b'', headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault('Content-Type', 'application/json')
        headers['Content-Length'] = str(len(body)) if 'Content-Length' not in headers else headers['Content-Length']
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[dict] = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head=head)

    def _error(self, status: int, message: str, code: Optional[str] = None, head: bool = False) -> None:
        message_header = ' '.join(message.split())  # a header value cannot hold a line break
        headers = {'X-Error-Message': message_header}
        if code:
            headers['X-Error-Code'] = code
        self._json(status, {'error': message}, headers, head=head)

    def _authorized(self) -> bool:
        token = self.fake_hub.token
        return token is None or self.headers.get('Authorization') == f'Bearer {token}'

    def _repo(self, repo_id: str, head: bool = False) -> Optional[_Repo]:
        repo = self.fake_hub.repos.get(repo_id)
        # like the Hub: a private repo without the right token reads as not found
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, f'Repository not found: {repo_id}', 'RepoNotFound', head=head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.fake_hub.lock:
            self.fake_hub.requests.append((method, path))
        parts = path.strip('/').split('/')
        try:
            with self.fake_hub.lock:
                self._route(method, parts, query)
        except BrokenPipeError:
            pass

    def do_GET(self) -> None:
        self._dispatch('GET')

    def do_HEAD(self) -> None:
        self._dispatch('HEAD')

    def do_POST(self) -> None:
        self._dispatch('POST')

    def do_PUT(self) -> None:
        self._dispatch('PUT')

    # ---- routing
    def _route(self, method: str, parts: List[str], query: dict) -> None:
        hub = self.fake_hub
        if method == 'POST' and parts == ['api', 'repos', 'create']:
            return self._create_repo()
        if method == 'POST' and parts == ['api', 'validate-yaml']:
            return self._validate_yaml()
        if method == 'PUT' and parts[:1] == ['lfs-upload'] and len(parts) == 2:
            data = self._body()
            if hashlib.sha256(data).hexdigest() != parts[1]:
                return self._error(400, 'LFS object does not match its oid')
            hub.lfs_objects[parts[1]] = data
            return self._send(200)
        if method == 'POST' and parts[:1] == ['lfs-verify'] and len(parts) == 2:
            self._body()
            return self._send(200 if parts[1] in hub.lfs_objects else 404, b'{}')
        if method == 'POST' and len(parts) == 6 and parts[1].endswith('.git') \
                and parts[2:] == ['info', 'lfs', 'objects', 'batch']:
            return self._lfs_batch(f'{parts[0]}/{parts[1][:-len(".git")]}')
        if parts[:2] == ['api', 'models'] and len(parts) >= 4:
            repo_id = f'{parts[2]}/{parts[3]}'
            rest = parts[4:]
            if method == 'POST' and rest[:1] == ['preupload'] and len(rest) >= 2:
                return self._preupload(repo_id, '/'.join(rest[1:]))
            if method == 'POST' and rest[:1] == ['commit'] and len(rest) >= 2:
                return self._commit(repo_id, '/'.join(rest[1:]), query)
            if method == 'GET' and not rest:
                return self._model_info(repo_id, 'main')
            if method == 'GET' and rest[:1] == ['revision'] and len(rest) >= 2:
                return self._model_info(repo_id, '/'.join(rest[1:]))
            if method == 'GET' and rest[:1] == ['tree'] and len(rest) >= 2:
                return self._tree(repo_id, rest[1])
        if method in ('GET', 'HEAD') and len(parts) >= 5 and parts[2] == 'resolve':
            return self._resolve(f'{parts[0]}/{parts[1]}', parts[3], '/'.join(parts[4:]), head=method == 'HEAD')
        return self._error(404, f'fake Hub has no route for {method} /{"/".join(parts)}')

    def _create_repo(self) -> None:
        payload = json.loads(self._body() or b'{}')
        if not self._authorized():
            return self._error(401, 'Invalid credentials in Authorization header')
        if not payload.get('organization'):
            return self._error(400, 'the fake Hub needs a namespace in the repo id')
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f'{self.fake_hub.url}/{repo_id}'
        if repo_id in self.fake_hub.repos:
            return self._json(409, {'error': 'You already created this model repo', 'url': url})
        self.fake_hub.repos[repo_id] = _Repo(repo_id, payload.get('visibility') == 'private')
        return self._json(200, {'url': url, 'name': repo_id})

    def _validate_yaml(self) -> None:
        """Like the Hub: the README's front matter must be a YAML mapping with a well-formed model-index."""
        payload = json.loads(self._body() or b'{}')
        match = re.match(r'^\s*---\r?\n([\s\S]*?)\r?\n---(\r?\n|$)', payload.get('content', ''))
        errors = []
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            data, errors = None, [f'Invalid YAML in README.md: {e}']
        if data is not None and not isinstance(data, dict):
            errors.append('README.md metadata must be a mapping')
        elif data:
            errors += _model_index_errors(data.get('model-index'))
        if errors:
            return self._json(400, {'errors': [{'message': m} for m in errors], 'warnings': []})
        warnings = [] if data else [{'message': 'empty or missing yaml metadata in repo card'}]
        return self._json(200, {'errors': [], 'warnings': warnings})

    def _preupload(self, repo_id: str, revision: str) -> None:
        payload = json.loads(self._body() or b'{}')
        if not self._authorized():
            return self._error(401, 'Invalid credentials in Authorization header')
        repo = self._repo(repo_id)
        if repo is None:
            return
        if repo.resolve(revision) is None:
            return self._error(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        files = [{'path': f['path'], 'uploadMode': 'lfs' if f['path'].endswith(_LFS_SUFFIXES) else 'regular',
                  'shouldIgnore': False, 'oid': None} for f in payload.get('files', [])]
        return self._json(200, {'files': files, 'commitOid': repo.resolve(revision)})

    def _lfs_batch(self, repo_id: str) -> None:
        payload = json.loads(self._body() or b'{}')
        if not self._authorized():
            return self._error(401, 'Invalid credentials in Authorization header')
        if self._repo(repo_id) is None:
            return
        objects = []
        for obj in payload.get('objects', []):
            entry = {'oid': obj['oid'], 'size': obj['size']}
            if obj['oid'] not in self.fake_hub.lfs_objects:
                entry['actions'] = {
                    'upload': {'href': f"{self.fake_hub.url}/lfs-upload/{obj['oid']}"},
                    'verify': {'href': f"{self.fake_hub.url}/lfs-verify/{obj['oid']}"},
                }
            objects.append(entry)
        return self._json(200, {'transfer': 'basic', 'objects': objects},
                          {'Content-Type': 'application/vnd.git-lfs+json'})

    def _commit(self, repo_id: str, revision: str, query: dict) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not self._authorized():
            return self._error(401, 'Invalid credentials in Authorization header')
        repo = self._repo(repo_id)
        if repo is None:
            return
        parent = repo.resolve(revision)
        if parent is None:
            return self._error(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        tree = dict(repo.commits[parent])
        summary = ''
        for line in lines:
            key, value = line['key'], line['value']
            if key == 'header':
                summary = value.get('summary', '')
            elif key == 'file':
                tree[value['path']] = {'data': base64.b64decode(value['content']), 'lfs': None}
            elif key == 'lfsFile':
                if value['oid'] not in self.fake_hub.lfs_objects:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                tree[value['path']] = {'data': None, 'lfs': value['oid']}
            elif key == 'deletedFile':
                tree.pop(value['path'], None)
            elif key == 'deletedFolder':
                tree = {p: f for p, f in tree.items() if not p.startswith(value['path'].rstrip('/') + '/')}
            else:
                return self._error(400, f'fake Hub does not support commit operation {key!r}')
        sha = repo._new_sha(summary)
        repo.commits[sha] = tree
        result = {'commitOid': sha, 'commitUrl': f'{self.fake_hub.url}/{repo_id}/commit/{sha}',
                  'success': True, 'commitMessage': summary}
        if query.get('create_pr', ['0'])[0] in ('1', 'true', 'True'):
            repo.num_prs += 1
            repo.refs[f'refs/pr/{repo.num_prs}'] = sha
            result['pullRequestUrl'] = f'{self.fake_hub.url}/{repo_id}/discussions/{repo.num_prs}'
        else:
            repo.refs[revision if revision in repo.refs else 'main'] = sha
        return self._json(200, result)

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        siblings = [{'rfilename': p} for p in sorted(repo.commits[sha])]
        return self._json(200, {'id': repo_id, 'modelId': repo_id, 'sha': sha, 'private': repo.private,
                                'siblings': siblings, 'tags': [], 'downloads': 0, 'likes': 0})

    def _tree(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        entries = []
        for p, f in sorted(repo.commits[sha].items()):
            data = self.fake_hub.lfs_objects[f['lfs']] if f['lfs'] else f['data']
            entry = {'type': 'file', 'path': p, 'size': len(data), 'oid': _git_blob_sha1(data)}
            if f['lfs']:
                entry['lfs'] = {'oid': f['lfs'], 'size': len(data), 'pointerSize': 130}
            entries.append(entry)
        return self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f'Invalid rev id: {revision}', 'RevisionNotFound', head=head)
        f = repo.commits[sha].get(path)
        if f is None:
            self.send_response(404)
            for k, v in {'X-Error-Code': 'EntryNotFound', 'X-Error-Message': f'Entry not found: {path}',
                         'X-Repo-Commit': sha, 'Content-Length': '0'}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        data = self.fake_hub.lfs_objects[f['lfs']] if f['lfs'] else f['data']
        headers = {'X-Repo-Commit': sha, 'Content-Type': 'application/octet-stream',
                   'ETag': f'"{f["lfs"] or _git_blob_sha1(data)}"', 'Content-Length': str(len(data))}
        if f['lfs']:
            headers.update({'X-Linked-Etag': f'"{f["lfs"]}"', 'X-Linked-Size': str(len(data))})
        return self._send(200, data, headers, head=head)


if __name__ == '__main__':
    import argparse
    import time

    parser = argparse.ArgumentParser(description='serve a fake Hugging Face Hub on 127.0.0.1')
    parser.add_argument('--token', default='hf_fake_token')
    args = parser.parse_args()
    with FakeHub(token=args.token) as hub:
        print(hub.url, flush=True)
        while True:
            time.sleep(3600)
