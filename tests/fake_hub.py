"""A small Hugging Face Hub stand-in on 127.0.0.1 for offline push/download tests.

It speaks the routes ``huggingface_hub`` (classic LFS transfer, ``HF_HUB_DISABLE_XET=1``) and transformers use:
repo creation, README metadata validation, pre-upload modes, the LFS batch API and uploads (sha256 checked), NDJSON
commits, file resolution (HEAD/GET) and repo info/tree listings. Clients must have ``HF_ENDPOINT`` pointing here
before ``huggingface_hub`` is imported, so the tests drive it from subprocesses.

Write routes require a bearer token. ``fail_lfs_uploads_after(n)`` makes every LFS upload after the n-th fail with
HTTP 507 (a server error huggingface_hub does not retry), to test a failure in the middle of an upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

RELATIONS = ("adapter", "merge", "quantized", "finetune")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+|[\w.-]+)"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def card_errors(readme: str) -> list[str]:
    """The checks the Hub applies to a model card's YAML front matter that petuning relies on."""
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    if not match:
        return []
    meta = yaml.safe_load(match.group(1)) or {}
    errors = []
    base = meta.get("base_model")
    for item in base if isinstance(base, list) else [base] if base is not None else []:
        if not isinstance(item, str) or not HUB_ID.match(item):
            errors.append(f'"base_model" must be a Hub model id, got {item!r}')
    if "base_model_relation" in meta and meta["base_model_relation"] not in RELATIONS:
        errors.append(f'"base_model_relation" must be one of {RELATIONS}')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    return errors


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "commits": [(sha, {path: bytes})]}
        self.lfs: dict[tuple[str, str], bytes] = {}  # (repo, oid) -> bytes: LFS storage is per repo
        self.tokens: set[str] = set()
        self.lfs_uploads = 0
        self.fail_after: int | None = None
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail_lfs_uploads_after(self, n: int | None) -> None:
        self.fail_after = None if n is None else self.lfs_uploads + n

    def files(self, repo: str) -> dict[str, bytes]:
        commits = self.repos.get(repo, {}).get("commits") or []
        return dict(commits[-1][1]) if commits else {}

    def snapshot(self, repo: str, revision: str):
        commits = self.repos.get(repo, {}).get("commits") or []
        for sha, files in reversed(commits):
            if revision in ("main", sha):
                return sha, files
        return None, None


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        # ----------------------------------------------------------------------------------- helpers
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                return self.rfile.read(length)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return b""

        def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None) -> None:
            data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:]:
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False
            hub.tokens.add(auth[7:])
            return True

        # ------------------------------------------------------------------------------------ routes
        def do_POST(self) -> None:
            path = urlparse(self.path).path
            body = self._body()
            if path == "/api/validate-yaml":
                errors = card_errors(json.loads(body)["content"])
                return self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
            if not self._authorized():
                return None
            if path == "/api/repos/create":
                request = json.loads(body)
                repo = (
                    f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                )
                with hub.lock:
                    exists = repo in hub.repos
                    private = bool(request.get("private")) or request.get("visibility") == "private"
                    hub.repos.setdefault(repo, {"private": private, "commits": []})
                return self._send(409 if exists else 200, {"url": f"{hub.url}/{repo}", "name": repo})
            if m := re.fullmatch(rf"/api/models/{REPO}/preupload/[^/]+", path):
                files = json.loads(body)["files"]
                modes = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs"
                        if f["path"].endswith(".safetensors") or f["size"] > 10_000_000
                        else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for f in files
                ]
                return self._send(200 if m["repo"] in hub.repos else 404, {"files": modes})
            if m := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path):
                objects = []
                for obj in json.loads(body)["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if (m["repo"], obj["oid"]) not in hub.lfs:
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{m['repo']}/{obj['oid']}"}}
                    objects.append(entry)
                return self._send(200, {"transfer": "basic", "objects": objects})
            if m := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path):
                return self._commit(m["repo"], body)
            return self._send(404, {"error": f"unknown route POST {path}"})

        def _commit(self, repo: str, body: bytes) -> None:
            if repo not in hub.repos:
                return self._send(404, {"error": f"Repository {repo} not found"})
            with hub.lock:
                files = hub.files(repo)
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if (repo, value["oid"]) not in hub.lfs:
                            return self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                        files[value["path"]] = hub.lfs[repo, value["oid"]]
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        files = {
                            p: d
                            for p, d in files.items()
                            if not (p == value["path"] or p.startswith(value["path"] + "/"))
                        }
                parent = hub.repos[repo]["commits"][-1][0] if hub.repos[repo]["commits"] else ""
                sha = hashlib.sha1(
                    (parent + json.dumps(sorted(git_blob_sha(d) for d in files.values()))).encode()
                ).hexdigest()
                hub.repos[repo]["commits"].append((sha, files))
            return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha})

        def do_PUT(self) -> None:
            path = urlparse(self.path).path
            body = self._body()
            m = re.fullmatch(rf"/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})", path)
            if not m:
                return self._send(404, {"error": f"unknown route PUT {path}"})
            with hub.lock:
                hub.lfs_uploads += 1
                failing = hub.fail_after is not None and hub.lfs_uploads > hub.fail_after
            if failing:
                return self._send(507, {"error": "Insufficient storage (injected failure)"})
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return self._send(400, {"error": "sha256 of the body does not match the oid"})
            hub.lfs[m["repo"], m["oid"]] = body
            return self._send(200, {})

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            parsed = urlparse(self.path)
            path = unquote(parsed.path)
            if m := re.fullmatch(rf"/api/models/{REPO}(/revision/(?P<rev>[^/]+))?", path):
                sha, files = hub.snapshot(m["repo"], m["rev"] or "main")
                if sha is None:
                    return self._send(
                        404, {"error": f"Repository {m['repo']} not found"}, {"X-Error-Code": "RepoNotFound"}
                    )
                siblings = [{"rfilename": p} for p in sorted(files)]
                return self._send(
                    200, {"id": m["repo"], "sha": sha, "siblings": siblings, "private": hub.repos[m["repo"]]["private"]}
                )
            if m := re.fullmatch(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(/(?P<sub>.*))?", path):
                sha, files = hub.snapshot(m["repo"], m["rev"])
                if sha is None:
                    return self._send(404, {"error": "not found"}, {"X-Error-Code": "RevisionNotFound"})
                sub = (m["sub"] or "").strip("/")
                entries = [_tree_entry(p, d) for p, d in sorted(files.items()) if not sub or p.startswith(sub + "/")]
                return self._send(200, entries)
            if m := re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
                sha, files = hub.snapshot(m["repo"], m["rev"])
                if sha is None or m["file"] not in files:
                    code = "RepoNotFound" if sha is None else "EntryNotFound"
                    return self._send(404, {"error": "not found"}, {"X-Error-Code": code, "X-Repo-Commit": sha or ""})
                data = files[m["file"]]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"'}
                if m["file"].endswith(".safetensors"):
                    oid = hashlib.sha256(data).hexdigest()
                    headers.update({"ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data))})
                return self._send(200, headers=headers, raw=data)
            return self._send(404, {"error": f"unknown route GET {path}"})

    return Handler


def _tree_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
    if path.endswith(".safetensors"):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
