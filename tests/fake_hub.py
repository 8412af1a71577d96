"""A fake Hugging Face hub on 127.0.0.1, speaking the hub's HTTP API as huggingface_hub 2.4 uses it.

The real hub cannot be reached from the test machines, so push and pull are tested against this server at the
transport level: huggingface_hub's own client sends its real requests (create repo, preupload, LFS batch, LFS
PUT, commit as NDJSON, model info, HEAD/GET resolve) over a real socket and gets answers in the hub's shapes.
The server keeps repos in memory; `fail` makes it answer an error (401, 404, 500) or stall (a timeout).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    private: bool = False


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.cards: list[str] = []  # README.md contents sent to /api/validate-yaml
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.fail: tuple[int | str, str] | None = None  # (status or "stall", path prefix)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> Repo:
        repo = Repo(dict(files))
        repo.sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                                .encode()).hexdigest()
        self.repos[repo_id] = repo
        return repo

    # ------------------------------------------------------------ the HTTP side

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      head: bool = False) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _failed(self) -> bool:
                hub.requests.append((self.command, self.path, dict(self.headers)))
                if hub.fail is None or not urlparse(self.path).path.startswith(hub.fail[1]):
                    return False
                status = hub.fail[0]
                if status == "stall":
                    time.sleep(3)
                    return True
                messages = {401: ("Invalid credentials in Authorization header", None),
                            404: ("Repository not found", "RepoNotFound"),
                            500: ("Internal Error - We're working hard to fix this as soon as possible!", None)}
                message, code = messages[status]
                self._json(status, {"error": message}, {"X-Error-Code": code} if code else {})
                return True

            def do_HEAD(self) -> None:
                if not self._failed():
                    self._resolve(head=True)

            def do_GET(self) -> None:
                if self._failed():
                    return
                path = urlparse(self.path).path
                if path.startswith("/api/models/"):
                    self._model_info(path.removeprefix("/api/models/"))
                else:
                    self._resolve(head=False)

            def do_PUT(self) -> None:
                if self._failed():
                    return
                oid = urlparse(self.path).path.rsplit("/", 1)[1]
                hub.lfs[oid] = self._body()
                self._send(200)

            def do_POST(self) -> None:
                if self._failed():
                    return
                path = urlparse(self.path).path
                body = self._body()
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}" \
                        if "/" not in payload["name"] else payload["name"]
                    hub.repos.setdefault(repo_id, Repo(private=payload.get("visibility") == "private"))
                    self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
                elif path == "/api/validate-yaml":
                    self._validate_yaml(json.loads(body)["content"])
                elif "/branch/" in path:
                    self._json(200, {})
                elif "/preupload/" in path:
                    files = json.loads(body)["files"]
                    self._json(200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                                "uploadMode": "lfs" if f["path"].endswith(".safetensors")
                                                else "regular"} for f in files]})
                elif path.endswith(".git/info/lfs/objects/batch"):
                    objects = json.loads(body)["objects"]
                    self._json(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}} for o in objects]},
                        {"Content-Type": "application/vnd.git-lfs+json"})
                elif "/commit/" in path:
                    self._commit(path, body)
                else:
                    self._json(404, {"error": "Not found"})

            def _validate_yaml(self, content: str) -> None:
                # The hub checks a model card's metadata before the commit; these are the rules we rely on.
                hub.cards.append(content)
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                errors = [] if isinstance(meta, dict) else [{"message": "no YAML metadata"}]
                if isinstance(meta, dict):
                    errors += [{"message": f'"{key}" must be a string'} for key in ("base_model", "library_name",
                               "pipeline_tag", "license") if key in meta and not isinstance(meta[key], str)]
                    for entry in meta.get("model-index", []):
                        for result in entry.get("results", []):
                            errors += [{"message": '"model-index[].results[].metrics[].value" must be a number'}
                                       for m in result.get("metrics", []) if not isinstance(m.get("value"), (int, float))]
                self._json(400 if errors else 200, {"errors": errors, "warnings": []})

            def _commit(self, path: str, body: bytes) -> None:
                repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
                repo = hub.repos[repo_id]
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "lfsFile":
                        repo.files[item["value"]["path"]] = hub.lfs[item["value"]["oid"]]
                repo.sha = hashlib.sha1(body).hexdigest()
                self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha})

            def _model_info(self, rest: str) -> None:
                repo_id = "/".join(rest.split("/")[:2])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return
                self._json(200, {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "sha": repo.sha,
                                 "private": repo.private, "tags": ["peft"], "library_name": "peft",
                                 "siblings": [{"rfilename": name} for name in sorted(repo.files)]})

            def _resolve(self, head: bool) -> None:
                # /{user}/{name}/resolve/{revision}/{path}
                parts = unquote(urlparse(self.path).path).lstrip("/").split("/")
                repo = hub.repos.get("/".join(parts[:2]))
                name = "/".join(parts[4:])
                if repo is None or len(parts) < 5 or parts[2] != "resolve" or name not in repo.files:
                    self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    return
                data = repo.files[name]
                self._send(200, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                       "Content-Type": "application/octet-stream"}, head=head)

        return Handler
