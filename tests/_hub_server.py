"""A loopback stand-in for the Hugging Face Hub, enough of its HTTP API for `huggingface_hub` 2.4 to
download (`hf_hub_download`, so timm's `hf-hub:` loading) and upload (`create_repo`, `create_branch`,
`create_tag`, `upload_folder`) model repos.

What it serves, as the Hub does (see `huggingface_hub/file_download.py: get_hf_file_metadata` and
`utils/_http.py: hf_raise_for_status`):

* `HEAD|GET /{repo}/resolve/{revision}/{path}`: small files answer 200 with `X-Repo-Commit`, a quoted git-blob
  `ETag` and `Content-Length`; weight files (`.safetensors`, `.bin`, `.pth`) answer 302 to a second
  loopback server (the "CDN", another origin, as the Hub's LFS storage is) with `X-Linked-Etag` (sha256),
  `X-Linked-Size` and `X-Repo-Commit`. Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
  `EntryNotFound`). A revision is a branch, a tag or a full commit sha.
* `POST /api/repos/create`, `/api/validate-yaml`, `/api/models/{repo}/preupload/{rev}` (every file "regular",
  i.e. inlined in the commit), `/api/models/{repo}/commit/{rev}` (ndjson), `/branch/{name}`, `/tag/{rev}`;
  `GET /api/models/{repo}[/revision/{rev}]`. Write calls need `Authorization: Bearer <token>`.

Every request is recorded in `requests` so tests can prove that an offline load made none.
"""
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = ('.safetensors', '.bin', '.pth')


@dataclass
class _Repo:
    private: bool = False
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    branches: Dict[str, str] = field(default_factory=dict)  # name -> sha
    tags: Dict[str, str] = field(default_factory=dict)


class FakeHub:
    """In-memory model repos behind two loopback HTTP servers (the Hub and its file CDN)."""

    def __init__(self, tokens: Tuple[str, ...] = ('hf_test_token',)):
        self.repos: Dict[str, _Repo] = {}
        self.tokens = set(tokens)
        self.requests: List[Tuple[str, str]] = []
        self._blobs: Dict[str, bytes] = {}  # sha256 -> content, served by the CDN
        self._lock = threading.Lock()
        self._counter = 0
        self._servers: List[ThreadingHTTPServer] = []
        self.endpoint = ''
        self.cdn = ''

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> 'FakeHub':
        for role in ('hub', 'cdn'):
            server = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
            server.daemon_threads = True
            server.hub, server.role = self, role  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
            url = f'http://127.0.0.1:{server.server_address[1]}'
            if role == 'hub':
                self.endpoint = url
            else:
                self.cdn = url
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    # -- repo state ------------------------------------------------------------------------------------------
    def _new_sha(self, files: Dict[str, bytes]) -> str:
        self._counter += 1
        h = hashlib.sha1(str(self._counter).encode())
        for path in sorted(files):
            h.update(path.encode() + hashlib.sha256(files[path]).digest())
        return h.hexdigest()

    def create_repo(self, repo_id: str, private: bool = False) -> _Repo:
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo(private=private))
            if not repo.branches:
                sha = self._new_sha({})
                repo.commits[sha] = {}
                repo.branches['main'] = sha
            return repo

    def add_commit(self, repo_id: str, files: Dict[str, bytes], branch: str = 'main') -> str:
        """Commit `files` (added / replaced) on top of `branch`; returns the new commit sha."""
        repo = self.create_repo(repo_id)
        with self._lock:
            if branch not in repo.branches:
                raise KeyError(branch)
            content = dict(repo.commits[repo.branches[branch]])
            content.update(files)
            sha = self._new_sha(content)
            repo.commits[sha] = content
            repo.branches[branch] = sha
            for data in files.values():
                self._blobs[hashlib.sha256(data).hexdigest()] = data
            return sha

    def add_tag(self, repo_id: str, tag: str, revision: str = 'main') -> None:
        repo = self.repos[repo_id]
        repo.tags[tag] = self.resolve(repo, revision)

    @staticmethod
    def resolve(repo: _Repo, revision: str) -> Optional[str]:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        return None

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[self.resolve(repo, revision)])


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server: ThreadingHTTPServer

    def log_message(self, fmt, *args):  # keep test output clean
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    # -- responses -------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              content_length: Optional[int] = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != 'HEAD' and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), dict({'Content-Type': 'application/json'}, **(headers or {})))

    def _error(self, status: int, code: Optional[str], message: str, headers: Optional[Dict[str, str]] = None):
        h = dict(headers or {})
        if code:
            h['X-Error-Code'] = code
        h['X-Error-Message'] = message
        self._json(status, {'error': message}, h)

    def _body(self) -> bytes:
        n = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(n) if n else b''

    def _authorized(self) -> bool:
        auth = self.headers.get('Authorization', '')
        return auth.startswith('Bearer ') and auth[len('Bearer '):] in self.hub.tokens

    # -- routing ---------------------------------------------------------------------------------------------
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def _route(self):
        path = urlsplit(self.path).path
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
        if self.server.role == 'cdn':  # type: ignore[attr-defined]
            return self._cdn(path)
        parts = [unquote(p) for p in path.strip('/').split('/')]
        if parts[:1] == ['api']:
            return self._api(parts[1:])
        if len(parts) >= 5 and parts[2] == 'resolve' and self.command in ('HEAD', 'GET'):
            return self._resolve(f'{parts[0]}/{parts[1]}', parts[3], '/'.join(parts[4:]))
        self._error(404, None, f'no route for {self.command} {path}')

    def _cdn(self, path: str):
        m = re.fullmatch(r'/lfs/([0-9a-f]{64})', path)
        data = self.hub._blobs.get(m.group(1)) if m else None
        if data is None:
            return self._error(404, None, 'no such blob')
        self._send(200, data, {'Content-Type': 'application/octet-stream', 'ETag': f'"{m.group(1)}"'})

    def _resolve(self, repo_id: str, revision: str, filename: str):
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            return self._error(404, 'RepoNotFound', 'Repository not found')
        sha = self.hub.resolve(repo, revision)
        if sha is None:
            return self._error(404, 'RevisionNotFound', 'Invalid rev id: ' + revision)
        files = repo.commits[sha]
        if filename not in files:
            return self._error(404, 'EntryNotFound', 'Entry not found', {'X-Repo-Commit': sha})
        data = files[filename]
        if filename.endswith(LFS_SUFFIXES):
            digest = hashlib.sha256(data).hexdigest()
            return self._send(302, b'', {
                'Location': f'{self.hub.cdn}/lfs/{digest}',
                'X-Repo-Commit': sha,
                'X-Linked-Etag': f'"{digest}"',
                'X-Linked-Size': str(len(data)),
                'ETag': f'"{_git_blob_sha(data)}"',
            })
        self._send(200, data, {
            'X-Repo-Commit': sha,
            'ETag': f'"{_git_blob_sha(data)}"',
            'Content-Type': 'application/octet-stream',
        })

    def _api(self, parts: List[str]):
        hub = self.hub
        if parts == ['repos', 'create'] and self.command == 'POST':
            if not self._authorized():
                return self._error(401, None, 'Invalid credentials in Authorization header')
            payload = json.loads(self._body() or b'{}')
            repo_id = f'{payload.get("organization")}/{payload["name"]}'
            exists = repo_id in hub.repos
            hub.create_repo(repo_id, private=payload.get('visibility') == 'private' or bool(payload.get('private')))
            if exists:
                return self._error(409, None, 'You already created this model repo')
            return self._json(200, {'url': f'{hub.endpoint}/{repo_id}', 'name': repo_id})
        if parts == ['validate-yaml'] and self.command == 'POST':
            self._body()
            return self._json(200, {'errors': [], 'warnings': []})
        if len(parts) < 3 or parts[0] != 'models':
            return self._error(404, None, 'unknown api route')
        repo_id, rest = f'{parts[1]}/{parts[2]}', parts[3:]
        repo = hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._body()
            return self._error(404, 'RepoNotFound', 'Repository not found')
        if self.command == 'GET' and (not rest or rest[0] == 'revision'):
            revision = rest[1] if len(rest) > 1 else 'main'
            sha = hub.resolve(repo, revision)
            if sha is None:
                return self._error(404, 'RevisionNotFound', 'Invalid rev id: ' + revision)
            return self._json(200, {
                'id': repo_id, 'modelId': repo_id, 'sha': sha, 'private': repo.private,
                'siblings': [{'rfilename': f} for f in sorted(repo.commits[sha])],
                'tags': [], 'library_name': 'timm'})
        if self.command != 'POST' or not rest:
            return self._error(404, None, 'unknown api route')
        body = self._body()
        if not self._authorized():
            return self._error(401, None, 'Invalid credentials in Authorization header')
        action, arg = rest[0], (rest[1] if len(rest) > 1 else 'main')
        if action == 'preupload':
            files = json.loads(body)['files']
            return self._json(200, {'files': [
                {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': None} for f in files]})
        if action == 'commit':
            if arg not in repo.branches:
                return self._error(404, 'RevisionNotFound', 'Invalid rev id: ' + arg)
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item['key'] == 'file':
                    files[item['value']['path']] = base64.b64decode(item['value']['content'])
                elif item['key'] != 'header':
                    return self._error(400, None, f'unsupported commit operation {item["key"]}')
            sha = hub.add_commit(repo_id, files, branch=arg)
            return self._json(200, {'commitUrl': f'{hub.endpoint}/{repo_id}/commit/{sha}', 'commitOid': sha,
                                    'success': True})
        if action == 'branch':
            start = json.loads(body or b'{}').get('startingPoint') or 'main'
            if arg in repo.branches:
                return self._error(409, None, 'Reference already exists')
            repo.branches[arg] = hub.resolve(repo, start)
            return self._json(200, {})
        if action == 'tag':
            tag = json.loads(body)['tag']
            if tag in repo.tags:
                return self._error(409, None, 'Tag already exists')
            sha = hub.resolve(repo, arg)
            if sha is None:
                return self._error(404, 'RevisionNotFound', 'Invalid rev id: ' + arg)
            repo.tags[tag] = sha
            return self._json(200, {})
        return self._error(404, None, 'unknown api route')
