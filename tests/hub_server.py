"""A stand-in for the Hugging Face hub: a real HTTP server on 127.0.0.1 that answers what
huggingface_hub asks of the hub, in the hub's URL layout and with its headers.

The hub cannot be reached from here, so only the remote side is a stand-in: the client is the
real huggingface_hub, pointed at this server with HF_ENDPOINT. What it serves:

    GET  /api/models/{org}/{name}/revision/{rev}?blobs=true   repo info: commit sha, files with sizes
    HEAD /{org}/{name}/resolve/{rev}/{path}                    X-Repo-Commit, ETag / X-Linked-Etag, size
    GET  /{org}/{name}/resolve/{rev}/{path}                    the bytes; `Range: bytes=N-` gives a 206

Errors as the hub sends them: X-Error-Code RepoNotFound (401 without a token, 404 with one),
GatedRepo (403), RevisionNotFound (404), and a 401 "Invalid credentials" for a wrong token.
A test can make the server drop the connection part-way through a file, or hold it there.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS = (".safetensors", ".bin", ".gguf")  # stored with Git LFS on the hub: the ETag is the SHA-256


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> content
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False


@dataclass
class Cut:
    """What happens to the next GET of one file: cut after `after` bytes, or held there until `release`."""

    after: int
    hold: threading.Event | None = None
    times: int = 1


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def etag_of(path: str, content: bytes) -> str:
    return hashlib.sha256(content).hexdigest() if path.endswith(LFS) else git_blob_id(content)


def model_files(folder: Path | str, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """A model folder's files as a repo holds them (plus a README and .gitattributes, as hub repos have)."""
    files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
    files.setdefault("README.md", b"---\nlibrary_name: mlx\ntags: [mlx]\n---\n# A tiny test model\n")
    files.setdefault(".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    return {**files, **(extra or {})}


class StandInHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.token: str | None = None  # set: requests with another bearer token are refused (401)
        self.cuts: dict[str, Cut] = {}  # file path -> what to do to its next GET
        self.claimed_sizes: dict[str, int] = {}  # file path -> the size the repo info claims instead of the real one
        self.requests: list[dict[str, str | None]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, body=False)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        for cut in self.cuts.values():
            if cut.hold is not None:
                cut.hold.set()
        self.server.shutdown()
        self.server.server_close()

    # -- content -------------------------------------------------------------------------------------
    def add_commit(
        self, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",), gated: bool = False
    ) -> str:
        """A commit of `files` in `repo_id`, which `refs` (branches or tags) then point at; its sha."""
        sha = hashlib.sha1(repr((repo_id, sorted((k, etag_of(k, v)) for k, v in files.items()))).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[sha] = dict(files)
        repo.gated = repo.gated or gated
        for ref in refs:
            repo.refs[ref] = sha
        return sha

    def gets_of(self, name: str) -> list[dict[str, str | None]]:
        """The GET requests for one file's bytes, in order, with their Range headers."""
        return [r for r in self.requests if r["method"] == "GET" and str(r["path"]).endswith(f"/{name}")]

    # -- answering -----------------------------------------------------------------------------------
    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        authorization = handler.headers.get("Authorization")
        with self._lock:
            self.requests.append(
                {
                    "method": handler.command,
                    "path": path,
                    "range": handler.headers.get("Range"),
                    "authorization": authorization,
                }
            )
        if self.token is not None and authorization not in (None, f"Bearer {self.token}"):
            return _send(
                handler,
                401,
                {"error": "Invalid credentials in Authorization header"},
                {"X-Error-Message": "Invalid credentials in Authorization header"},
                body,
            )
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            return self._repo_info(handler, "/".join(parts[2:4]), "/".join(parts[5:]), authorization, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(handler, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), authorization, body)
        _send(handler, 404, {"error": "no such route"}, {}, body)

    def _commit(self, handler, repo_id: str, revision: str, authorization: str | None, body: bool):
        repo = self.repos.get(repo_id)
        if repo is None:  # the hub answers 401 to anonymous callers, so as not to say whether it exists
            _send(
                handler,
                404 if authorization else 401,
                {"error": "Repository not found"},
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                body,
            )
            return None, None
        if repo.gated and not authorization:
            _send(
                handler,
                403,
                {"error": "Access to this model is restricted"},
                {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted"},
                body,
            )
            return None, None
        sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            _send(
                handler,
                404,
                {"error": "Invalid rev id"},
                {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"},
                body,
            )
            return None, None
        return sha, repo.commits[sha]

    def _repo_info(self, handler, repo_id: str, revision: str, authorization: str | None, body: bool) -> None:
        sha, files = self._commit(handler, repo_id, revision, authorization, body)
        if sha is None:
            return
        siblings = []
        for name, content in sorted(files.items()):
            size = self.claimed_sizes.get(name, len(content))
            sibling = {"rfilename": name, "size": size, "blobId": git_blob_id(content)}
            if name.endswith(LFS):
                sibling["lfs"] = {"size": size, "sha256": etag_of(name, content), "pointerSize": 134}
            siblings.append(sibling)
        _send(
            handler,
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "gated": "manual" if self.repos[repo_id].gated else False,
                "tags": ["mlx"],
                "library_name": "mlx",
                "siblings": siblings,
            },
            {},
            body,
        )

    def _file(self, handler, repo_id: str, revision: str, name: str, authorization: str | None, body: bool) -> None:
        sha, files = self._commit(handler, repo_id, revision, authorization, body)
        if sha is None:
            return
        if name not in files:
            _send(
                handler,
                404,
                {"error": "Entry not found"},
                {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha},
                body,
            )
            return
        content = files[name]
        etag = etag_of(name, content)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if name.endswith(LFS):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
        start = 0
        wanted = handler.headers.get("Range") if body else None
        if wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes=") : -1])
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        payload = content[start:]
        handler.send_response(206 if start else 200)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if not body:
            return
        cut = self.cuts.get(name)
        if cut is not None and cut.times > 0 and start < cut.after:
            cut.times -= 1
            handler.wfile.write(payload[: cut.after - start])
            handler.wfile.flush()
            if cut.hold is not None:
                cut.hold.wait(60)
            handler.close_connection = True
            handler.connection.shutdown(2)  # mid-body: the client sees the connection drop
            return
        handler.wfile.write(payload)


def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict[str, str], body: bool) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    for key, value in {"Content-Type": "application/json", **headers, "Content-Length": str(len(data))}.items():
        handler.send_header(key, value)
    handler.end_headers()
    if body:
        handler.wfile.write(data)
