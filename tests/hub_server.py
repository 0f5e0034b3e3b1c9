"""A Hugging Face Hub-compatible HTTP server for tests (stdlib only, 127.0.0.1, an ephemeral port).

It implements what huggingface_hub 2.4 needs to create model repositories, commit to them (files
inline in the commit, or through the classic Git LFS batch/PUT/verify path), branch, tag, list and
download them (the routes of docs/hub.md, The test server):

    with HubServer(mode="lfs", token="hf_test") as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("org/name")

Storage is in memory: file contents addressed by sha256; commits with real 40-hex ids (sha1 of the
parent, the tree, the message and the time); branches and tags pointing at them. `mode="lfs"`
answers "lfs" for weight files in preupload (the client must have Xet disabled); `mode="regular"`
answers "regular" for every file, so content travels inline in the commit (works with Xet enabled).

Test hooks: `fail(method, pattern, status, times)` answers the next matching requests with an error
(after reading their body, as a real server does); `tamper(repo, path)` flips bytes of a stored file
without touching its recorded hashes (storage corruption); `requests` logs every call and
`authorizations` every Authorization header seen. With `token`, writes (and reads of private repos)
need `Authorization: Bearer <token>`.

Not covered: Xet storage, multipart LFS uploads, pull requests, CDN redirects, pagination, gated
repos, datasets and spaces.
"""

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".zip", ".tar")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores larger files through LFS whatever their name
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    """Git's object id of a blob: sha1 over a 'blob <size>\\0' header and the content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of a commit's tree."""

    sha256: str  # key of the content in the blob store
    size: int
    lfs: bool
    oid: str  # git blob id: of the content, or of the LFS pointer file


@dataclass
class Commit:
    id: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{40}", revision or ""):
            sha = revision
        return self.commits.get(sha) if sha else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


class HubServer:
    """Start with `start()` (or `with`); `url` is the endpoint to give huggingface_hub."""

    def __init__(self, mode: str = "lfs", token: str | None = None):
        assert mode in ("lfs", "regular"), mode
        self.mode, self.token = mode, token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content (LFS objects and inline files alike)
        self.uploads: dict[str, tuple[str, int]] = {}  # signed upload nonce -> (sha256, size)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.authorizations: set[str] = set()
        self._failures: list[list] = []  # [method, compiled pattern, status, remaining]
        self._lock = threading.RLock()
        self._http = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    # -- test hooks -----------------------------------------------------------------------------
    def fail(self, method: str, pattern: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests `method` whose path matches `pattern` (regex) with `status`."""
        with self._lock:
            self._failures.append([method, re.compile(pattern), status, times])

    def tamper(self, repo_id: str, path: str, revision: str = "main") -> None:
        """Flip the first bytes of a stored file, keeping its size and its recorded hashes."""
        with self._lock:
            entry = self.repos[repo_id].resolve(revision).files[path]
            data = bytearray(self.blobs[entry.sha256])
            data[:8] = bytes(b ^ 0xFF for b in data[:8])
            self.blobs[entry.sha256] = bytes(data)

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id].resolve(revision).id

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.blobs[self.repos[repo_id].resolve(revision).files[path].sha256]

    def _take_failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure[0] == method and failure[1].search(path) and failure[3] > 0:
                    failure[3] -= 1
                    return failure[2]
        return None

    # -- storage --------------------------------------------------------------------------------
    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _entry(self, data: bytes, lfs: bool) -> Entry:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(sha, data)
        return Entry(sha, len(data), lfs, git_blob_id(lfs_pointer(sha, len(data)) if lfs else data))

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, Entry], title: str, message: str) -> Commit:
        parent = repo.branches.get(branch)
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = json.dumps({"parent": parent, "tree": {p: e.oid for p, e in sorted(files.items())},
                           "title": title, "message": message, "date": date}, sort_keys=True)
        commit = Commit(hashlib.sha1(body.encode()).hexdigest(), parent, files, title, message, date)
        repo.commits[commit.id] = commit
        repo.branches[branch] = commit.id
        return commit

    def upload_mode(self, path: str, size: int) -> str:
        if self.mode == "regular" or size == 0:
            return "regular"
        return "lfs" if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE else "regular"


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive bookkeeping

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- plumbing -------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
              content_length: int | None = None) -> None:
        if isinstance(body, dict | list):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        # Logged before answering: once the client has the answer, the log already holds it.
        self.hub.requests.append((self.command, self.path, status))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        if auth:
            self.hub.authorizations.add(auth)
        return self.hub.token is None or auth == f"Bearer {self.hub.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body() if method in ("POST", "PUT") else b""
        status = self.hub._take_failure(method, url.path)
        if status is not None:
            return self._send(status, {"error": f"injected failure {status}"}, {"X-Error-Message": "injected failure"})
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            with self.hub._lock:
                self._route(method, parts)
        except HubError as e:
            headers = {"X-Error-Message": str(e)}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, {"error": str(e)}, headers)

    def _route(self, method: str, p: list[str]) -> None:
        if p[:2] == ["api", "repos"] and p[2:] == ["create"] and method == "POST":
            return self._create_repo()
        if p == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if p[:2] == ["api", "models"] and len(p) >= 4:
            repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
            routes = {("GET", ""): self._info, ("GET", "revision"): self._info, ("GET", "tree"): self._tree,
                      ("POST", "paths-info"): self._paths_info, ("GET", "refs"): self._refs,
                      ("GET", "commits"): self._commits, ("POST", "preupload"): self._preupload,
                      ("POST", "commit"): self._commit_route, ("POST", "tag"): self._tag,
                      ("DELETE", "tag"): self._delete_ref, ("POST", "branch"): self._branch,
                      ("DELETE", "branch"): self._delete_ref}
            handler = routes.get((method, rest[0] if rest else ""))
            if handler:
                return handler(repo_id, rest)
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{p[0]}/{p[1][:-4]}")
        if p[0] == "lfs-upload" and len(p) == 2 and method == "PUT":
            return self._lfs_put(p[1])
        if p[0] == "lfs-verify" and len(p) == 2 and method == "POST":
            return self._lfs_verify(p[1])
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise HubError(404, f"no route for {method} /{'/'.join(p)} in the test server")

    # -- repositories ---------------------------------------------------------------------------
    def _create_repo(self) -> None:
        self._require_auth()
        payload = json.loads(self.body)
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "the test server hosts model repositories only")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        repo = self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private"
                                              or bool(payload.get("private")))
        self.hub._new_commit(repo, "main", {".gitattributes": self.hub._entry(GITATTRIBUTES, False)},
                             "initial commit", "")
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        content = json.loads(self.body).get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
                if not isinstance(meta, dict):
                    errors.append("metadata must be a YAML mapping")
                elif "base_model_relation" in meta and meta["base_model_relation"] not in (
                        "adapter", "merge", "quantized", "finetune"):
                    errors.append("\"base_model_relation\" must be one of adapter, merge, quantized, finetune")
            except yaml.YAMLError as e:
                errors.append(f"invalid YAML: {e}")
        if errors:
            return self._send(400, {"errors": [{"message": m} for m in errors], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _info(self, repo_id: str, rest: list[str]) -> None:
        repo = self.hub._repo(repo_id, self._authorized())
        commit = self.hub._commit(repo, rest[1] if len(rest) > 1 else "main")
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": commit.id, "private": repo.private,
                         "lastModified": commit.date, "tags": [], "downloads": 0, "likes": 0,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _file_json(self, path: str, entry: Entry) -> dict:
        item = {"type": "file", "path": path, "size": entry.size, "oid": entry.oid}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                           "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
        return item

    def _listing(self, files: dict[str, Entry], prefix: str, recursive: bool) -> list[dict]:
        items, folders = [], set()
        for path, entry in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = path[len(prefix) + 1 if prefix else 0:].split("/")
            for depth in range(1, len(parts)):
                folders.add("/".join(filter(None, [prefix, *parts[:depth]])))
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                items.append(self._file_json(path, entry))
        dirs = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return dirs + items

    def _tree(self, repo_id: str, rest: list[str]) -> None:
        repo = self.hub._repo(repo_id, self._authorized())
        commit = self.hub._commit(repo, rest[1] if len(rest) > 1 else "main")
        prefix = "/".join(rest[2:])
        if prefix and not any(p.startswith(prefix + "/") for p in commit.files):
            raise HubError(404, f"{prefix} not found", "EntryNotFound", commit.id)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._send(200, self._listing(commit.files, prefix, recursive))

    def _paths_info(self, repo_id: str, rest: list[str]) -> None:
        repo = self.hub._repo(repo_id, self._authorized())
        commit = self.hub._commit(repo, rest[1])
        out = []
        for path in parse_qs(self.body.decode()).get("paths", []):
            if path in commit.files:
                out.append(self._file_json(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
        self._send(200, out)

    def _refs(self, repo_id: str, rest: list[str]) -> None:
        repo = self.hub._repo(repo_id, self._authorized())

        def refs(kind, names):
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(names.items())]

        self._send(200, {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags),
                         "converts": [], "pullRequests": []})

    def _commits(self, repo_id: str, rest: list[str]) -> None:
        repo = self.hub._repo(repo_id, self._authorized())
        commit, out = self.hub._commit(repo, rest[1] if len(rest) > 1 else "main"), []
        while commit is not None:
            out.append({"id": commit.id, "title": commit.title, "message": commit.message, "date": commit.date,
                        "authors": [{"user": "loram-test"}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send(200, out)

    def _tag(self, repo_id: str, rest: list[str]) -> None:
        self._require_auth()
        repo = self.hub._repo(repo_id, True)
        commit = self.hub._commit(repo, rest[1] if len(rest) > 1 else "main")
        tag = json.loads(self.body)["tag"]
        if tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Reference {tag} already exists")
        repo.tags[tag] = commit.id
        self._send(200, {})

    def _branch(self, repo_id: str, rest: list[str]) -> None:
        self._require_auth()
        repo = self.hub._repo(repo_id, True)
        name = rest[1]
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        if name in repo.branches or name in repo.tags:
            raise HubError(409, f"Reference {name} already exists")
        repo.branches[name] = self.hub._commit(repo, start).id
        self._send(200, {})

    def _delete_ref(self, repo_id: str, rest: list[str]) -> None:
        self._require_auth()
        repo = self.hub._repo(repo_id, True)
        refs = repo.tags if rest[0] == "tag" else repo.branches
        if refs.pop(rest[1], None) is None:
            raise HubError(404, f"Invalid rev id: {rest[1]}", "RevisionNotFound")
        self._send(200, {})

    # -- uploads --------------------------------------------------------------------------------
    def _preupload(self, repo_id: str, rest: list[str]) -> None:
        self._require_auth()
        repo = self.hub._repo(repo_id, True)
        commit = self.hub._commit(repo, rest[1])
        files = []
        for f in json.loads(self.body)["files"]:
            mode = self.hub.upload_mode(f["path"], f["size"])
            entry = commit.files.get(f["path"])
            # The client compares this oid with its own: sha256 for LFS files, the git blob id otherwise.
            oid = None if entry is None else entry.sha256 if mode == "lfs" else git_blob_id(self.hub.blobs[entry.sha256])
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": commit.id})

    def _lfs_batch(self, repo_id: str) -> None:
        self._require_auth()
        self.hub._repo(repo_id, True)
        payload = json.loads(self.body)
        if payload.get("operation") != "upload":
            raise HubError(400, "the test server accepts LFS uploads only (downloads use /resolve)")
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.blobs:
                nonce = secrets.token_hex(16)  # a signed URL: the PUT carries no Authorization header
                self.hub.uploads[nonce] = (obj["oid"], obj["size"])
                item["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{nonce}", "header": {}},
                                   "verify": {"href": f"{self.hub.url}/lfs-verify/{nonce}", "header": {}}}
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, nonce: str) -> None:
        if nonce not in self.hub.uploads:
            raise HubError(403, "unknown or expired upload URL")
        sha, size = self.hub.uploads[nonce]
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != sha:
            raise HubError(400, "uploaded content does not match the announced sha256 and size")
        self.hub.blobs[sha] = self.body
        self._send(200, headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_verify(self, nonce: str) -> None:
        self._require_auth()
        sha, size = self.hub.uploads.get(nonce, (None, None))
        payload = json.loads(self.body)
        if sha is None or payload.get("oid") != sha or sha not in self.hub.blobs:
            raise HubError(404, "LFS object not found")
        del self.hub.uploads[nonce]
        self._send(200, {})

    def _commit_route(self, repo_id: str, rest: list[str]) -> None:
        self._require_auth()
        repo = self.hub._repo(repo_id, True)
        branch = rest[1]
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the test server")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to branches)", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent and not head.id.startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}: the branch head is {head.id}")
        files = dict(head.files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = self.hub._entry(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in self.hub.blobs:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = self.hub._entry(self.hub.blobs[value["oid"]], True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        commit = self.hub._new_commit(repo, branch, files, header.get("summary", ""), header.get("description", ""))
        self._send(200, {"success": True, "commitOid": commit.id, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.id}",
                         "hookOutput": "", "pullRequestUrl": None})

    # -- downloads ------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self.hub._repo(repo_id, self._authorized())
        commit = self.hub._commit(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.id)
        data = self.hub.blobs[entry.sha256]
        headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers |= {"ETag": f'"{entry.sha256}"', "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        else:
            headers["ETag"] = f'"{entry.oid}"'
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[start:], headers)
        self._send(200, data, headers, content_length=len(data))
