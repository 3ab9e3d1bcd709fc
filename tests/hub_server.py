"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, serving one folder as one repo.

Just what huggingface_hub's real ``snapshot_download`` and ``HfApi.model_info`` ask for: repo info
with file metadata (``/api/models/<repo>[/revision/<rev>]``), the tree listing
(``/api/models/<repo>/tree/<rev>``) and ``HEAD``/``GET /<repo>/resolve/<rev>/<path>`` with the
headers the hub sends (``X-Repo-Commit``, ``ETag`` = sha256 for LFS files, git blob sha1 for
others). Every request is recorded, so tests can see what the client fetched.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from hf_cache import blob_name, git_sha1, is_lfs, source_files


class HubServer:
    def __init__(self, src: Path, repo_id: str, commit: str):
        self.repo_id, self.commit = repo_id, commit
        self.files = {rel: p.read_bytes() for rel, p in source_files(src).items()}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server._resolve(self, body=False)

            def do_GET(self):
                server._get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fetched(self) -> set[str]:
        return {path for method, path in self.requests if method == "GET"}

    def _send(self, h, status: int, headers: dict[str, str], body: bytes = b"",
              send_body: bool = True) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if send_body:
            h.wfile.write(body)

    def _resolve(self, h, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        rest = path[len(f"/{self.repo_id}/resolve/"):]
        _rev, _, rel = rest.partition("/")
        self.requests.append(("GET" if body else "HEAD", rel))
        data = self.files.get(rel)
        if data is None:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound"}, send_body=body)
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{blob_name(rel, data)}"'}
        self._send(h, 200, headers, data, send_body=body)

    def _get(self, h) -> None:
        path = unquote(urlparse(h.path).path)
        api = f"/api/models/{self.repo_id}"
        if path.startswith(f"/{self.repo_id}/resolve/"):
            return self._resolve(h, body=True)
        if path == api or path.startswith(f"{api}/revision/"):
            doc = {"id": self.repo_id, "sha": self.commit, "siblings": [
                self._entry(rel, data, "sibling") for rel, data in self.files.items()]}
        elif path.startswith(f"{api}/tree/"):
            doc = [self._entry(rel, data, "tree") for rel, data in self.files.items()]
        else:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"})
        self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(doc).encode())

    @staticmethod
    def _entry(rel: str, data: bytes, kind: str) -> dict:
        lfs = {"size": len(data), "pointerSize": 134}
        if kind == "sibling":
            e = {"rfilename": rel, "size": len(data), "blobId": git_sha1(data)}
            lfs["sha256"] = blob_name(rel, data)
        else:
            e = {"type": "file", "path": rel, "size": len(data), "oid": git_sha1(data)}
            lfs["oid"] = blob_name(rel, data)
        if is_lfs(rel):
            e["lfs"] = lfs
        return e
