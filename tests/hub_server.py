"""A real HTTP Hugging Face Hub API server on 127.0.0.1, for Hub tests without network and without mocks.

Project rule: Hub tests talk to a real HTTP server speaking the Hub's REST API rather than mocking `HfApi`
methods. `LocalHub` keeps repos in memory (files -> bytes, one sha1 commit id per commit, branches, tags and
pull-request refs) and serves them from a `ThreadingHTTPServer` running in a daemon thread on an ephemeral port.
The real `huggingface_hub` / `transformers` clients run unmodified against it: `create_repo`, `upload_folder`,
`upload_file`, `create_commit`, `push_to_hub`, `hf_hub_download`, `snapshot_download`, `from_pretrained(repo_id)`
(including `trust_remote_code=True`), `ModelCard.push_to_hub` / `ModelCard.load`, `list_repo_files`, ...

Usage from another test module (tests/ is on sys.path with pytest's default rootdir import mode)::

    from hub_server import local_hub  # noqa: F401

    def test_push(local_hub):
        model.push_to_hub("me/tiny")              # really POSTs to local_hub.url
        assert "config.json" in local_hub.files("me/tiny")

The `local_hub` fixture points huggingface_hub, transformers (and datasets, if already imported) at the server for
the duration of one test, with an isolated HF_HOME / HF_HUB_CACHE under `tmp_path`, a dummy `HF_TOKEN` and offline
mode off. Environment variables are set too, so subprocesses started by the test (e.g. a fresh interpreter loading
`trust_remote_code` models) talk to the same server.

Uploads: the server answers every `preupload` request with `uploadMode: "regular"`, so file contents always come
inline (base64) in the NDJSON commit payload: no LFS batch API and no Xet. The server never advertises Xet (no
`X-Xet-*` headers, no `xet-auth` links, no `xetHash` in tree entries), so downloads are plain HTTP GETs of
`/{repo_id}/resolve/{revision}/{path}` as well.

Routes (repo_type in models/datasets/spaces; the model API prefix is `/api/models/...`, resolve URLs of datasets and
spaces are prefixed with `/datasets/` or `/spaces/`):

- GET  /api/whoami-v2
- POST /api/repos/create, DELETE /api/repos/delete, POST /api/repos/move
- POST /api/validate-yaml
- GET  /api/{type}s/{repo_id}[/revision/{rev}]        (repo info: sha, siblings, cardData, ...)
- GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]      (?recursive=, ?expand=)
- POST /api/{type}s/{repo_id}/paths-info/{rev}
- POST /api/{type}s/{repo_id}/preupload/{rev}
- POST /api/{type}s/{repo_id}/commit/{rev}             (NDJSON: header, file, lfsFile, deletedFile, deletedFolder)
- GET  /api/{type}s/{repo_id}/refs, GET /api/{type}s/{repo_id}/commits/{rev}
- POST/DELETE /api/{type}s/{repo_id}/branch/{branch}, POST/DELETE /api/{type}s/{repo_id}/tag/{tag|rev}
- HEAD/GET [/{type}s]/{repo_id}/resolve/{rev}/{path}  (X-Repo-Commit, ETag, Content-Length, Range)

Errors carry the `X-Error-Code` header the client maps to exceptions: `RepoNotFound` (RepositoryNotFoundError),
`RevisionNotFound` (RevisionNotFoundError), `EntryNotFound` (EntryNotFoundError / RemoteEntryNotFoundError).
Unknown routes answer 404 and are recorded in `LocalHub.unhandled`; every request is recorded in
`LocalHub.requests` as `(method, path, status)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["LocalHub", "HubError", "local_hub", "point_hf_clients_at", "git_blob_sha1", "DUMMY_TOKEN"]

DUMMY_TOKEN = "hf_localhubdummytoken0000000000000000"
DEFAULT_USER = "me"
REPO_TYPES = ("model", "dataset", "space")
_API_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Keywords that follow the repo id in `/api/{type}s/{repo_id}/<keyword>/...` routes.
_API_KEYWORDS = {"revision", "tree", "paths-info", "preupload", "commit", "branch", "tag", "refs", "commits"}

# What a brand new repo on the Hub contains (abridged version of the Hub's default `.gitattributes`).
_DEFAULT_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub reports as `oid` / ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubError(Exception):
    """An HTTP error answer: status, optional `X-Error-Code`, message (also sent as JSON `{"error": ...}`)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more JSON fields of the error body (the Hub's 409 carries "url")


@dataclass(frozen=True)
class Commit:
    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    files: Mapping[str, bytes]  # full snapshot of the tree at this commit: path -> content
    author: str = DEFAULT_USER


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit oid
    tags: dict[str, str] = field(default_factory=dict)
    n_pull_requests: int = 0
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


def _parse_card_metadata(readme: bytes) -> dict | None:
    """YAML front matter of a README.md, as the Hub exposes it in `cardData` (None if absent/invalid)."""
    text = readme.decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    parts = text.split("\n")
    try:
        end = next(i for i in range(1, len(parts)) if parts[i].rstrip() == "---")
    except StopIteration:
        return None
    import yaml

    try:
        data = yaml.safe_load("\n".join(parts[1:end]))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class LocalHub:
    """In-memory Hugging Face Hub served over real HTTP on 127.0.0.1.

    Besides the HTTP API, it offers direct helpers to seed and inspect repos from tests: `create_repo`, `commit`,
    `files`, `file`, `head`, `history`, `repo_exists`.
    """

    def __init__(self, user: str = DEFAULT_USER, *, host: str = "127.0.0.1", port: int = 0):
        self.user = user
        self._host = host
        self._port = port
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.requests: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        server = ThreadingHTTPServer((self._host, self._port), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # end idle keep-alive connections so their handler threads exit
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ direct (Python-side) helpers

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False
    ) -> Repo:
        if repo_type not in REPO_TYPES:
            raise ValueError(f"unknown repo_type {repo_type!r}")
        if "/" not in repo_id:
            repo_id = f"{self.user}/{repo_id}"
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                if exist_ok:
                    return self._repos[key]
                raise HubError(409, "You already created this model repo", headers={"X-Error-Code": "RepoExists"})
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            files = {".gitattributes": _DEFAULT_GITATTRIBUTES}
            initial = self._make_commit(repo, parents=(), files=files, title="initial commit", message="")
            repo.branches["main"] = initial.oid
            self._repos[key] = repo
            return repo

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        deletions: Iterable[str] = (),
        message: str = "commit from test",
        repo_type: str = "model",
        branch: str = "main",
    ) -> str:
        """Commit directly (no HTTP) to an existing repo; returns the new commit oid."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if branch not in repo.branches:
                raise KeyError(f"no branch {branch!r} in {repo_id}")
            tree = dict(repo.commits[repo.branches[branch]].files)
            for path in deletions:
                tree.pop(path)
            for path, content in (files or {}).items():
                tree[path] = content.encode() if isinstance(content, str) else bytes(content)
            new = self._make_commit(repo, parents=(repo.branches[branch],), files=tree, title=message, message="")
            repo.branches[branch] = new.oid
            return new.oid

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._get_repo(repo_type, repo_id).branches[branch]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return dict(self._get_commit(repo, revision).files)

    def file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return self.files(repo_id, revision, repo_type)[path]

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from `revision` (first-parent), newest first."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            out, commit = [], self._get_commit(repo, revision)
            while True:
                out.append(commit)
                if not commit.parents:
                    return out
                commit = repo.commits[commit.parents[0]]

    # ------------------------------------------------------------------ internals: store

    def _get_repo(self, repo_type: str, repo_id: str, *, authorized: bool = True) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve_oid(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        if len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        oid = self._resolve_oid(repo, revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def _make_commit(
        self, repo: Repo, *, parents: tuple[str, ...], files: Mapping[str, bytes], title: str, message: str
    ) -> Commit:
        h = hashlib.sha1()
        # A random salt keeps commit ids unique across hubs/test runs (transformers caches remote code by commit id).
        for part in (repo.repo_id, *parents, title, message, uuid.uuid4().hex):
            h.update(part.encode() + b"\0")
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = Commit(
            oid=h.hexdigest(), parents=parents, title=title, message=message, date=_now_iso(), files=dict(files)
        )
        repo.commits[commit.oid] = commit
        return commit

    def _dirs(self, files: Iterable[str]) -> set[str]:
        dirs = set()
        for path in files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        """Most recent commit (first-parent walk) that changed `path` (a file or a folder prefix)."""

        def view(c: Commit) -> dict[str, bytes]:
            return {p: b for p, b in c.files.items() if p == path or p.startswith(path + "/")}

        current, current_view = commit, view(commit)
        while current.parents:
            parent = repo.commits[current.parents[0]]
            parent_view = view(parent)
            if parent_view != current_view:
                return current
            current, current_view = parent, parent_view
        return current

    def _tree_entry(self, repo: Repo, commit: Commit, path: str, *, expand: bool) -> dict:
        if path in commit.files:
            content = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path}
        else:
            children = sorted(
                f"{p}:{git_blob_sha1(b)}" for p, b in commit.files.items() if p.startswith(path + "/")
            )
            entry = {"type": "directory", "oid": hashlib.sha1("\n".join(children).encode()).hexdigest(), "size": 0,
                     "path": path}
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
            if entry["type"] == "file":
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False},
                                               "pickleImportScan": None}
        return entry

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------------ internals: HTTP routing

    def _handle(self, req: "_Handler", method: str) -> None:
        split = urlsplit(req.path)
        raw_segments = [s for s in split.path.split("/") if s != ""]
        segments = [unquote(s) for s in raw_segments]
        query = parse_qs(split.query, keep_blank_values=True)
        authorized = bool(req.headers.get("Authorization", "").strip())
        body = req.read_body()
        try:
            with self._lock:
                status, headers, payload = self._route(method, segments, query, req.headers, body, authorized)
        except HubError as err:
            status = err.status
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message.replace("\n", " ")
            payload = {"error": err.message, **err.extra}
        except Exception as err:  # a bug in the server: answer 500 rather than hanging the client
            status, headers, payload = 500, {"X-Error-Message": repr(err)}, {"error": f"LocalHub error: {err!r}"}
        req.send(method, status, headers, payload)
        with self._lock:
            self.requests.append((method, split.path, status))
            if status == 404 and payload == {"error": "Not Found"}:
                self.unhandled.append((method, req.path))

    def _route(
        self, method: str, seg: list[str], query: dict, headers: Any, body: bytes, authorized: bool
    ) -> tuple[int, dict, Any]:
        if not seg:
            return 200, {}, {"hub": "LocalHub"}
        if seg[0] == "api":
            return self._route_api(method, seg[1:], query, headers, body, authorized)
        # HEAD/GET [/{type}s]/{repo_id}/resolve/{rev}/{path}
        if method in ("GET", "HEAD"):
            repo_type, rest = "model", seg
            if rest[0] in ("datasets", "spaces") and len(rest) > 1:
                repo_type, rest = _API_PLURALS[rest[0]], rest[1:]
            for n_id in (2, 1):
                if len(rest) > n_id + 2 and rest[n_id] == "resolve":
                    repo_id = "/".join(rest[:n_id])
                    return self._resolve(
                        method, repo_type, repo_id, rest[n_id + 1], "/".join(rest[n_id + 2:]), headers, authorized
                    )
        raise HubError(404, "Not Found")

    def _split_repo_id(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        """Split `{repo_id}/{keyword}/...` where repo_id is `namespace/name` or a canonical `name`."""
        if len(rest) >= 2 and (repo_type, "/".join(rest[:2])) in self._repos:
            return "/".join(rest[:2]), rest[2:]
        if rest and (repo_type, rest[0]) in self._repos:
            return rest[0], rest[1:]
        if len(rest) >= 2 and rest[1] in _API_KEYWORDS and len(rest) >= 3:
            return rest[0], rest[1:]
        return "/".join(rest[:2]), rest[2:]

    def _route_api(
        self, method: str, seg: list[str], query: dict, headers: Any, body: bytes, authorized: bool
    ) -> tuple[int, dict, Any]:
        if not seg:
            raise HubError(404, "Not Found")
        head = seg[0]
        if seg == ["whoami-v2"] and method == "GET":
            if not authorized:
                raise HubError(401, "Invalid credentials in Authorization header")
            return 200, {}, self._whoami()
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(_json(body))
        if head == "repos" and len(seg) == 2 and method in ("POST", "DELETE"):
            self._require_auth(authorized)
            return self._repos_action(seg[1], _json(body))
        if head in _API_PLURALS and len(seg) >= 2:
            repo_type = _API_PLURALS[head]
            repo_id, rest = self._split_repo_id(repo_type, seg[1:])
            return self._repo_api(method, repo_type, repo_id, rest, query, headers, body, authorized)
        raise HubError(404, "Not Found")

    @staticmethod
    def _require_auth(authorized: bool) -> None:
        if not authorized:
            raise HubError(401, "You must be authenticated to write to the Hub (send a token)")

    def _whoami(self) -> dict:
        return {
            "type": "user",
            "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
            "name": self.user,
            "fullname": self.user.capitalize(),
            "email": f"{self.user}@example.com",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "local-hub", "role": "write", "createdAt": _now_iso()},
            },
        }

    def _validate_yaml(self, data: dict) -> tuple[int, dict, Any]:
        content = data.get("content") or ""
        if content.startswith("---"):
            import yaml

            lines = content.split("\n")
            end = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
            if end is not None:
                try:
                    meta = yaml.safe_load("\n".join(lines[1:end]))
                except yaml.YAMLError as err:
                    return 400, {}, {"errors": [{"message": f"Invalid YAML in README.md: {err}"}], "warnings": []}
                if meta is not None and not isinstance(meta, dict):
                    return 400, {}, {"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def _repos_action(self, action: str, data: dict) -> tuple[int, dict, Any]:
        repo_type = data.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        if action == "create":
            name, org = data.get("name"), data.get("organization") or self.user
            if not name:
                raise HubError(400, "Missing repo name")
            private = bool(data.get("private")) or data.get("visibility") == "private"
            try:
                repo = self.create_repo(f"{org}/{name}", repo_type=repo_type, private=private)
            except HubError as err:  # like the Hub: 409 with the existing repo's url (huggingface_hub reads it)
                existing = self._get_repo(repo_type, f"{org}/{name}")
                raise HubError(409, err.message, headers={"X-Error-Code": "RepoExists"},
                               extra={"url": self._repo_url(existing)}) from None
            return 200, {}, {"url": self._repo_url(repo), "name": repo.repo_id, "id": repo.uid}
        if action == "delete":
            name, org = data.get("name"), data.get("organization") or self.user
            repo = self._get_repo(repo_type, f"{org}/{name}")
            del self._repos[(repo_type, repo.repo_id)]
            return 200, {}, {}
        if action == "move":
            from_id, to_id = data.get("fromRepo"), data.get("toRepo")
            repo = self._get_repo(repo_type, from_id)
            if (repo_type, to_id) in self._repos:
                raise HubError(409, f"{to_id} already exists")
            del self._repos[(repo_type, from_id)]
            repo.repo_id = to_id
            self._repos[(repo_type, to_id)] = repo
            return 200, {}, {}
        raise HubError(404, "Not Found")

    def _repo_api(
        self,
        method: str,
        repo_type: str,
        repo_id: str,
        rest: list[str],
        query: dict,
        headers: Any,
        body: bytes,
        authorized: bool,
    ) -> tuple[int, dict, Any]:
        repo = self._get_repo(repo_type, repo_id, authorized=authorized)
        kw, args = (rest[0], rest[1:]) if rest else ("", [])
        if method == "GET" and kw == "":
            return 200, {}, self._repo_info(repo, "main", query)
        if method == "GET" and kw == "revision" and len(args) == 1:
            return 200, {}, self._repo_info(repo, args[0], query)
        if method == "GET" and kw == "tree" and args:
            commit = self._get_commit(repo, args[0])
            return 200, {}, self._tree(repo, commit, "/".join(args[1:]).strip("/"), query)
        if method == "POST" and kw == "paths-info" and len(args) == 1:
            commit = self._get_commit(repo, args[0])
            form = _form_or_json(headers, body)
            paths = form.get("paths") or []
            paths = [paths] if isinstance(paths, str) else paths
            expand = str(_first(form.get("expand"), "false")).lower() == "true"
            out = []
            for path in dict.fromkeys(p.strip("/") for p in paths):
                if path in commit.files or path in self._dirs(commit.files):
                    out.append(self._tree_entry(repo, commit, path, expand=expand))
            return 200, {}, out
        if method == "GET" and kw == "refs":
            return 200, {}, self._refs(repo, query)
        if method == "GET" and kw == "commits" and len(args) == 1:
            return 200, {}, [
                {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                 "authors": [{"user": c.author, "avatar": ""}]}
                for c in self.history(repo.repo_id, args[0], repo.repo_type)
            ]
        if method == "POST" and kw == "preupload" and len(args) == 1:
            self._require_auth(authorized)
            return 200, {}, self._preupload(repo, args[0], _json(body))
        if method == "POST" and kw == "commit" and len(args) == 1:
            self._require_auth(authorized)
            return 200, {}, self._commit_ndjson(repo, args[0], body, query)
        if kw == "branch" and len(args) == 1 and method in ("POST", "DELETE"):
            self._require_auth(authorized)
            return self._branch(repo, method, args[0], _json(body))
        if kw == "tag" and len(args) == 1 and method in ("POST", "DELETE"):
            self._require_auth(authorized)
            return self._tag(repo, method, args[0], _json(body))
        raise HubError(404, "Not Found")

    def _repo_info(self, repo: Repo, revision: str, query: dict) -> dict:
        commit = self._get_commit(repo, revision)
        blobs = str(_first(query.get("blobs"), "false")).lower() == "true"
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_sha1(commit.files[path]))
            siblings.append(sibling)
        card = _parse_card_metadata(commit.files["README.md"]) if "README.md" in commit.files else None
        namespace = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "author": namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": siblings,
            "usedStorage": sum(len(b) for b in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["library_name"] = (card or {}).get("library_name")
            info["pipeline_tag"] = (card or {}).get("pipeline_tag")
            if "config.json" in commit.files:
                try:
                    config = json.loads(commit.files["config.json"])
                    info["config"] = {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
                except (ValueError, TypeError):
                    pass
        elif repo.repo_type == "space":
            info["sdk"] = (card or {}).get("sdk")
        return info

    def _tree(self, repo: Repo, commit: Commit, path: str, query: dict) -> list[dict]:
        recursive = str(_first(query.get("recursive"), "false")).lower() == "true"
        expand = str(_first(query.get("expand"), "false")).lower() == "true"
        dirs = self._dirs(commit.files)
        if path and path not in dirs:
            raise HubError(404, f"Path {path} not found in tree", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        prefix = f"{path}/" if path else ""
        entries = []
        for candidate in sorted(set(commit.files) | dirs):
            if not candidate.startswith(prefix):
                continue
            if not recursive and "/" in candidate[len(prefix):]:
                continue
            entries.append(self._tree_entry(repo, commit, candidate, expand=expand))
        # Like the Hub: folders first, then files
        entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        return entries

    def _refs(self, repo: Repo, query: dict) -> dict:
        def ref(name: str, prefix: str, oid: str) -> dict:
            return {"name": name, "ref": f"{prefix}{name}", "targetCommit": oid}

        out = {
            "branches": [ref(b, "refs/heads/", o) for b, o in repo.branches.items() if not b.startswith("refs/")],
            "tags": [ref(t, "refs/tags/", o) for t, o in repo.tags.items()],
            "converts": [],
        }
        if str(_first(query.get("include_prs"), "false")).lower() in ("true", "1"):
            out["pullRequests"] = [
                {"name": b, "ref": b, "targetCommit": o} for b, o in repo.branches.items() if b.startswith("refs/pr/")
            ]
        return out

    def _preupload(self, repo: Repo, revision: str, data: dict) -> dict:
        oid = self._resolve_oid(repo, revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[oid].files
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",  # never "lfs": content comes inline in the commit payload
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None,
                }
                for f in data.get("files", [])
            ],
            "commitOid": oid,
        }

    def _commit_ndjson(self, repo: Repo, revision: str, body: bytes, query: dict) -> dict:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        create_pr = str(_first(query.get("create_pr"), "0")).lower() in ("1", "true")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        base_oid = repo.branches[revision]
        parent = header.get("parentCommit")
        if parent is not None:
            parent_oid = self._resolve_oid(repo, parent)
            if parent_oid is None:
                raise HubError(404, f"Invalid parent commit: {parent}", "RevisionNotFound")
            if parent_oid != base_oid and not create_pr:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            base_oid = parent_oid
        tree = dict(repo.commits[base_oid].files)
        sha256_index = None
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "base64") == "base64":
                    tree[path] = base64.b64decode(content)
                else:
                    tree[path] = content.encode()
            elif key == "lfsFile":
                if sha256_index is None:  # only content already on this hub can be referenced (copies)
                    sha256_index = {
                        hashlib.sha256(b).hexdigest(): b
                        for r in self._repos.values() for c in r.commits.values() for b in c.files.values()
                    }
                if value.get("oid") not in sha256_index:
                    raise HubError(422, f"LFS object {value.get('oid')} for {path} was never uploaded "
                                        "(LocalHub only accepts regular uploads)")
                tree[path] = sha256_index[value["oid"]]
            elif key == "deletedFile":
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                doomed = [p for p in tree if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self._make_commit(
            repo,
            parents=(base_oid,),
            files=tree,
            title=header.get("summary") or "",
            message=header.get("description") or "",
        )
        pr_url = None
        if create_pr:
            repo.n_pull_requests += 1
            repo.branches[f"refs/pr/{repo.n_pull_requests}"] = commit.oid
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.n_pull_requests}"
        else:
            repo.branches[revision] = commit.oid
        return {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        }

    def _branch(self, repo: Repo, method: str, branch: str, data: dict) -> tuple[int, dict, Any]:
        if method == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return 200, {}, {}
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = data.get("startingPoint") or "main"
        repo.branches[branch] = self._get_commit(repo, start).oid
        return 200, {}, {}

    def _tag(self, repo: Repo, method: str, name: str, data: dict) -> tuple[int, dict, Any]:
        if method == "DELETE":
            if name not in repo.tags:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            del repo.tags[name]
            return 200, {}, {}
        tag = data.get("tag")
        if not tag:
            raise HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = self._get_commit(repo, name).oid
        return 200, {}, {}

    def _resolve(
        self, method: str, repo_type: str, repo_id: str, revision: str, path: str, headers: Any, authorized: bool
    ) -> tuple[int, dict, Any]:
        repo = self._get_repo(repo_type, repo_id, authorized=authorized)
        commit = self._get_commit(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        out_headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_sha1(content)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        range_header = headers.get("Range")
        if range_header:
            span = _parse_range(range_header, len(content))
            if span is None:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(content)}"})
            start, end = span
            out_headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return 206, out_headers, content[start : end + 1]
        return 200, out_headers, content


def _first(values: Any, default: Any) -> Any:
    if values is None:
        return default
    if isinstance(values, list):
        return values[0] if values else default
    return values


def _json(body: bytes) -> dict:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise HubError(400, "Invalid JSON body") from None
    return data if isinstance(data, dict) else {}


def _form_or_json(headers: Any, body: bytes) -> dict:
    if "json" in (headers.get("Content-Type") or ""):
        return _json(body)
    return parse_qs(body.decode("utf-8"), keep_blank_values=True)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> inclusive (start, end); None if not satisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            start, end = max(size - n, 0), size - 1
        else:
            start = int(first)
            end = int(last) if last else size - 1
    except ValueError:
        return None
    end = min(end, size - 1)
    if start >= size or start > end:
        return None
    return start, end


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        if os.environ.get("LOCAL_HUB_DEBUG"):
            sys.stderr.write("LocalHub: " + (format % args) + "\n")

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, method: str, status: int, headers: Mapping[str, str], payload: Any) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
        else:
            data = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json; charset=utf-8", **headers}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        self.hub._handle(self, self.command)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


# ---------------------------------------------------------------------- client configuration + pytest fixture


def point_hf_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: str | os.PathLike) -> None:
    """Point huggingface_hub / transformers / datasets (in this process and in subprocesses) at `endpoint`.

    huggingface_hub reads `HF_ENDPOINT` & co. at import time into `huggingface_hub.constants`, and a few values are
    derived from them at import time too (`HUGGINGFACE_CO_URL_TEMPLATE`, `HF_URL_HOSTS`, `_http._HUB_ORIGINS`, the
    module-level `HfApi()` singleton behind `huggingface_hub.upload_file` & co., transformers' cached `hf_api()`), so
    setting the environment is not enough for the current process: patch all of those. Everything is undone by
    `monkeypatch` at teardown. The env vars are what subprocesses use.
    """
    from urllib.parse import urlsplit as _urlsplit

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    home = Path(hf_home)
    hub_cache, assets_cache, xet_cache = home / "hub", home / "assets", home / "xet"
    token_path = home / "token"

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache),
        "HF_XET_CACHE": str(xet_cache),
        "HF_TOKEN_PATH": str(token_path),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
        "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1", "localhost"])),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN",
                "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HUGGINGFACE_CO_STAGING", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)

    host = (_urlsplit(endpoint).hostname or "").lower()
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", frozenset()) | {host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache),
        "HUGGINGFACE_ASSETS_CACHE": str(assets_cache),
        "HF_XET_CACHE": str(xet_cache),
        "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }.items():
        monkeypatch.setattr(constants, name, value, raising=False)

    # Captured at import time from constants.ENDPOINT:
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # singleton behind huggingface_hub.upload_file & co.
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    for module_name, attr, value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(assets_cache)),
        ("huggingface_hub.utils._git_credential", "ENDPOINT", endpoint),
        # transformers caches one HfApi (with its endpoint) in `transformers.utils.hub._hf_api`: drop it.
        ("transformers.utils.hub", "_hf_api", None),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            monkeypatch.setattr(module, attr, value)

    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # datasets copies HF_ENDPOINT & cache paths at import time as well
        for name, value in {
            "HF_ENDPOINT": endpoint,
            "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
            "HF_DATASETS_CACHE": home / "datasets",
            "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
            "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
        }.items():
            if hasattr(datasets_config, name):
                monkeypatch.setattr(datasets_config, name, value)

    # HfFileSystem instances are cached by their init args (endpoint=None included): start fresh.
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A started `LocalHub` that huggingface_hub / transformers clients (and subprocesses) talk to."""
    hub = LocalHub().start()
    try:
        point_hf_clients_at(monkeypatch, hub.url, tmp_path / "hf_home")
        yield hub
    finally:
        hub.stop()
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()
