"""Hub downloads owned by the worker, before an engine starts: only the files vLLM needs, into
the node's cache that every engine of the node shares.

    downloads = Downloads(node_id="vm", cache_dir=None, endpoint="")
    path = downloads.cached("Qwen/Qwen2.5-0.5B-Instruct", "main")   # milliseconds, no network
    progress = Progress()
    path = downloads.fetch("Qwen/Qwen2.5-0.5B-Instruct", "main", progress)  # blocking: a thread

`fetch` holds a file lock per repository for the whole download, so two deployments of one
model on one node download it once (the second finds it cached when the lock is free). It uses
`huggingface_hub.snapshot_download` with its cache layout: an interrupted download (dropped
connection, worker restart) resumes from the partial `.incomplete` blobs. HF_TOKEN comes from
this process's environment at download time and goes only to the hub; HF_ENDPOINT (or the
`hub_endpoint` setting) and HF_HUB_OFFLINE are honoured. Failures are raised as `DownloadFailed`,
classified by `failures.from_download`. `Progress` is read by the worker about once a second to
write bytes done/total and the rate into the engine record.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Any

import filelock

from ..config import HubAccess, hub_access
from ..engine import local_models
from .failures import DownloadFailed, Failure, from_download, not_cached

__all__ = ["ALLOW_PATTERNS", "Downloads", "Progress", "is_hub_id"]

ALLOW_PATTERNS = [
    "*.json",  # config, generation config, tokenizer config, safetensors index
    "*.safetensors",
    "*.jinja",  # chat template
    "tokenizer.model",  # sentencepiece tokenizers
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
]
"""What vLLM loads from a hub repository; weights in other formats (*.bin, *.pth, *.gguf, ONNX)
and originals in sub-folders are left on the hub."""
IGNORE_PATTERNS = ["original/*", "*/original/*", "onnx/*", "*.onnx*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RATE_WINDOW_S = 5.0


def is_hub_id(model: str) -> bool:
    """`org/name` that is neither a local alias nor an existing path."""
    if local_models.lookup(model) is not None or model.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(model)) and not Path(model).exists()


class Progress:
    """Bytes of one download, measured from the repository's blob folder (thread-safe reads)."""

    def __init__(self) -> None:
        self.total = 0
        self.files = 0
        self.waiting = False
        """True while another download of the same repository holds the lock."""
        self._blobs: Path | None = None
        self._baseline = 0
        self._resumed = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def begin(self, blobs: Path, *, total: int, files: int) -> None:
        size, partial = _folder_size(blobs)
        with self._lock:
            self._blobs, self.total, self.files = blobs, total, files
            self._baseline, self._resumed = size, partial

    def done(self) -> int:
        with self._lock:
            blobs, baseline, resumed = self._blobs, self._baseline, self._resumed
        if blobs is None:
            return 0
        size, _ = _folder_size(blobs)
        return max(0, min(self.total, size - baseline + resumed)) if self.total else 0

    def sample(self, now: float | None = None) -> tuple[int, float]:
        """Bytes done and the rate (bytes/s) over the last few seconds."""
        now = time.monotonic() if now is None else now
        done = self.done()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        return done, max(0.0, rate)


def _folder_size(folder: Path) -> tuple[int, int]:
    """(all bytes, bytes in .incomplete files) directly inside `folder`."""
    total = partial = 0
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return 0, 0
    for p in entries:
        try:
            size = p.stat().st_size
        except FileNotFoundError:  # renamed from .incomplete meanwhile
            continue
        total += size
        if p.name.endswith(".incomplete"):
            partial += size
    return total, partial


@dataclasses.dataclass
class Downloads:
    """The hub downloads of one node."""

    node_id: str
    cache_dir: Path | None = None
    """None: huggingface_hub's cache (HF_HUB_CACHE / HF_HOME)."""
    endpoint: str = ""
    """"": HF_ENDPOINT, else https://huggingface.co."""
    max_workers: int = 8

    @property
    def cache(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    def cached(self, repo: str, revision: str) -> Path | None:
        """The complete cached snapshot of `repo` at `revision`, without asking the hub."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(
                snapshot_download(
                    repo,
                    revision=revision,
                    cache_dir=self.cache,
                    allow_patterns=ALLOW_PATTERNS,
                    ignore_patterns=IGNORE_PATTERNS,
                    local_files_only=True,
                )
            )
        except (LocalEntryNotFoundError, ValueError, OSError):
            return None

    def fetch(self, repo: str, revision: str, progress: Progress) -> Path:
        """Download (or find cached) the files vLLM needs; blocking. Raises DownloadFailed."""
        lock_path = self.cache / ".deepinfer-locks" / f"{_folder(repo)}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lock_path))
        progress.waiting = True
        with lock:
            progress.waiting = False
            path = self.cached(repo, revision)
            if path is not None:
                return path
            return self._download(repo, revision, progress)

    def _download(self, repo: str, revision: str, progress: Progress) -> Path:
        from huggingface_hub import snapshot_download

        access = hub_access(endpoint=self.endpoint)
        if access.offline:
            raise DownloadFailed(
                not_cached(repo=repo, node=self.node_id, endpoint=access.endpoint, offline=True)
            )
        kwargs: dict[str, Any] = {
            "revision": revision,
            "cache_dir": self.cache,
            "allow_patterns": ALLOW_PATTERNS,
            "ignore_patterns": IGNORE_PATTERNS,
            "token": access.token or False,  # False: never a token from another place
            "endpoint": access.endpoint,
        }
        planned = False
        try:
            plan = snapshot_download(repo, dry_run=True, **kwargs)
            planned = True
            todo = [f for f in plan if f.will_download]
            progress.begin(
                self.cache / _folder(repo) / "blobs",
                total=sum(f.file_size or 0 for f in todo),
                files=len(todo),
            )
            path = snapshot_download(repo, max_workers=self.max_workers, **kwargs)
        except Exception as exc:
            raise DownloadFailed(self._classify(exc, repo, revision, access, planned)) from exc
        return Path(path)

    def _classify(
        self, exc: BaseException, repo: str, revision: str, access: HubAccess, planned: bool
    ) -> Failure:
        return from_download(
            exc,
            repo=repo,
            revision=revision,
            node=self.node_id,
            endpoint=access.endpoint,
            token_set=access.token is not None,
            planned=planned,
        )


def _folder(repo: str) -> str:
    """huggingface_hub's cache folder name of a model repository."""
    return "models--" + repo.replace("/", "--")
