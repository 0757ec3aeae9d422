"""Hub downloads owned by the worker, before an engine starts: only the files vLLM needs, into
the node's cache that every engine of the node shares.

    downloads = Downloads(node_id="vm", cache_dir=None, endpoint="")
    path = downloads.cached("Qwen/Qwen2.5-0.5B-Instruct", "main")   # milliseconds, no network
    progress = Progress()
    path = downloads.fetch("Qwen/Qwen2.5-0.5B-Instruct", "main", progress)  # blocking: a thread

`fetch` holds a file lock per repository for the whole download, so two deployments of one
model on one node download it once (the second finds it cached when the lock is free). It plans
with `huggingface_hub.snapshot_download(dry_run=True)`, fetches the large files (weights) itself
into the cache's blobs through partial files with stable names, so an interrupted download
(dropped connection, worker restart) resumes with a Range request, then lets
`snapshot_download` fetch the small files and link the snapshot (huggingface_hub's cache layout,
so other tools find the model). HF_TOKEN comes from the deployment's `secrets` (resolved by the
worker from its environment or secrets file) or this process's environment at download time
and goes only to the hub; HF_ENDPOINT (or the `hub_endpoint` setting) and HF_HUB_OFFLINE are
honoured. Failures are raised as `DownloadFailed`,
classified by `failures.from_download`. `Progress` counts bytes as they are written; the worker
reads it about once a second into the engine record (done/total and the rate).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http.client as http_client
import logging
import threading
import time
from pathlib import Path
from typing import Any

import filelock

from ..config import HubAccess, hub_access
from ..hub import http
from ..hub.failures import DownloadFailed, Failure, from_download, not_cached

__all__ = ["ALLOW_PATTERNS", "Cancelled", "Downloads", "Progress"]

log = logging.getLogger(__name__)

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
RATE_WINDOW_S = 5.0
RESUMABLE_MIN = 16 << 20
"""Files this large (the weights) are fetched by `_fetch_blob`, resumable across restarts."""
PARTIAL = ".deepinfer-partial"
CHUNK = 1 << 20
STREAM_TIMEOUT_S = 30.0
STREAM_RETRIES = 5
"""Failed attempts in a row before a download gives up (the engine's restart resumes it)."""


class Progress:
    """Bytes of one download, counted as they are written (read from other threads)."""

    def __init__(self) -> None:
        self.total = 0
        self.files = 0
        self.waiting = False
        """True while another download of the same repository holds the lock."""
        self._done = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the download to stop at its next chunk (the engine was stopped meanwhile)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def begin(self, *, total: int, files: int) -> None:
        with self._lock:
            self.total, self.files, self._done = total, files, 0
            self._samples = collections.deque([(time.monotonic(), 0)])

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n

    def resumed(self, n: int) -> None:
        """`n` bytes found from an earlier attempt: done, but not part of the rate."""
        with self._lock:
            self._done += n
            self._samples = collections.deque((t, d + n) for t, d in self._samples)

    def finish(self) -> None:
        with self._lock:
            self._done = self.total

    def done(self) -> int:
        with self._lock:
            return max(0, min(self._done, self.total)) if self.total else 0

    def sample(self, now: float | None = None) -> tuple[int, float]:
        """Bytes done and the rate (bytes/s) over the last few seconds."""
        now = time.monotonic() if now is None else now
        done = self.done()
        with self._lock:
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
                self._samples.popleft()
            t0, d0 = self._samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        return done, max(0.0, rate)


class Cancelled(Exception):
    """The download was asked to stop (`Progress.cancel`); the partial file stays for later."""


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

    def fetch(
        self, repo: str, revision: str, progress: Progress, *, token: str | None = None
    ) -> Path:
        """Download (or find cached) the files vLLM needs; blocking. Raises DownloadFailed.
        `token`: the deployment's HF_TOKEN secret (resolved by the worker), else HF_TOKEN of this
        process."""
        lock_path = self.cache / ".deepinfer-locks" / f"{_folder(repo)}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lock_path))
        progress.waiting = True
        with lock:
            progress.waiting = False
            path = self.cached(repo, revision)
            if path is not None:
                return path
            return self._download(repo, revision, progress, token)

    def _download(
        self, repo: str, revision: str, progress: Progress, token: str | None = None
    ) -> Path:
        from huggingface_hub import snapshot_download

        access = hub_access(endpoint=self.endpoint)
        if token:
            access = dataclasses.replace(access, token=token)
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
            progress.begin(total=sum(f.file_size or 0 for f in todo), files=len(todo))
            big = [f for f in todo if (f.file_size or 0) >= RESUMABLE_MIN]
            with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
                for _ in pool.map(lambda f: self._fetch_blob(repo, f, access, progress), big):
                    pass
            # The small files, and the snapshot's links to the blobs fetched above.
            path = snapshot_download(repo, max_workers=self.max_workers, **kwargs)
        except Cancelled:
            raise
        except Exception as exc:
            raise DownloadFailed(self._classify(exc, repo, revision, access, planned)) from exc
        progress.finish()
        return Path(path)

    def _fetch_blob(self, repo: str, file: Any, access: HubAccess, progress: Progress) -> None:
        """One large file into the cache's blob, resumable: the bytes go to a partial file with
        a stable name, so a later attempt (another process after a worker restart included)
        asks only for the rest. huggingface_hub's own partial files are unique per process and
        deleted on failure, so they cannot resume across a restart."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(repo, file.filename, revision=file.commit_hash, endpoint=access.endpoint)
        meta = get_hf_file_metadata(url, token=access.token or False, endpoint=access.endpoint)
        if not meta.etag or meta.size is None:
            return  # nothing to resume by: huggingface_hub downloads it
        blob = self.cache / _folder(repo) / "blobs" / meta.etag
        part = blob.with_name(meta.etag + PARTIAL)
        if blob.exists():
            progress.resumed(meta.size)
            return
        blob.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > meta.size:
            part.unlink()
            have = 0
        progress.resumed(have)
        failures = 0
        while have < meta.size:
            before = have
            try:
                have = self._stream(url, part, have, access, progress)
                if have < meta.size:
                    raise OSError(f"connection closed after {have} of {meta.size} bytes")
            except (OSError, http_client.HTTPException) as exc:
                have = part.stat().st_size if part.exists() else 0
                # Attempts without a new byte count; one that made progress resumes at once.
                failures = 0 if have > before else failures + 1
                if failures > STREAM_RETRIES:
                    raise OSError(f"{file.filename}: {exc}") from exc
                log.warning("%s: %s; resuming at byte %d", file.filename, exc, have)
                time.sleep(min(2.0**failures, 10.0) if failures else 0.0)
        if have != meta.size:
            raise OSError(f"{file.filename}: got {have} bytes, expected {meta.size}")
        part.replace(blob)

    @staticmethod
    def _stream(url: str, part: Path, have: int, access: HubAccess, progress: Progress) -> int:
        """Append the bytes from `have` on to `part`; returns the new size (short of the file's
        end when the connection dropped: the caller asks again from there)."""
        with http.get(url, token=access.token, start=have, timeout=STREAM_TIMEOUT_S) as r:
            mode = "ab"
            if have and r.status != 206:  # the server ignored the Range: start over
                progress.add(-have)
                have, mode = 0, "wb"
            with part.open(mode) as f:
                while True:
                    try:
                        chunk = r.read1(CHUNK)  # what has arrived: a drop loses nothing written
                    except http_client.IncompleteRead as exc:
                        chunk = exc.partial
                    if not chunk:
                        break
                    if progress.cancelled:
                        raise Cancelled(f"download of {url} stopped")
                    f.write(chunk)
                    have += len(chunk)
                    progress.add(len(chunk))
        return have

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
