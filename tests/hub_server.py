"""A model hub on 127.0.0.1 in the Hugging Face hub's layout, for the download tests.

It answers `HEAD|GET /{org}/{name}/resolve/{revision}/{filename}` as the hub does for the client
(huggingface_hub's file_download.py): ETag (the file's sha256, as the hub gives for LFS files),
X-Repo-Commit, Content-Length, and `X-Error-Code: EntryNotFound` / `RepoNotFound` on a 404.
With `cut` set to a file name, the download of that file stops after half its bytes and the
connection closes; the hub then answers 503 (a hub that went away) until `cut` is None again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from indexer.models.identity import demo_checkpoint, demo_config, demo_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DEMO_REPO = "clipseek-test/demo"


def demo_repo_files() -> dict[str, bytes]:
    """The bundled demo model as open_clip publishes a model on the hub: its config (naming the
    repository as its Hugging Face tokenizer's), its tokenizer's files and its weights."""
    model = json.loads(Path(demo_config()).read_text())
    model["text_cfg"]["hf_tokenizer_name"] = DEMO_REPO
    tokenizer = {name: (demo_tokenizer() / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    return {
        "open_clip_config.json": json.dumps({"model_cfg": model, "preprocess_cfg": {}}).encode(),
        **tokenizer,
        "open_clip_model.safetensors": Path(demo_checkpoint()).read_bytes(),
    }


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.cut: str | None = None
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args) -> None:  # the test output shows the client's side
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        if self.server.cut == "":  # cut before: the hub went away
            self._error(503, "")
            return
        repo, _, rest = self.path.lstrip("/").partition("/resolve/")
        _, _, filename = rest.partition("/")
        if repo not in self.server.repos:
            self._error(404, "RepoNotFound")
            return
        content = self.server.repos[repo].get(filename)
        if content is None:
            self._error(404, "EntryNotFound")
            return
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if not body:
            return
        if self.server.cut == filename:
            self.wfile.write(content[: len(content) // 2])
            self.wfile.flush()
            self.server.cut = ""
            self.close_connection = True
            return
        self.wfile.write(content)

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def serving_hub(repos: dict[str, dict[str, bytes]] | None = None):
    """Yields a running Hub (the demo model as DEMO_REPO by default); stops it afterwards."""
    hub = Hub(repos if repos is not None else {DEMO_REPO: demo_repo_files()})
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
