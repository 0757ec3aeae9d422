"""Worker downloads against the local hub double (a real HTTP server; huggingface_hub for real):
only the files vLLM needs, cache hits without the hub, one download for two concurrent fetches,
resume after a dropped connection, and the failure classes of not found, gated and offline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepinfer_nb.control.downloads import Cancelled, Downloads, Progress
from deepinfer_nb.hub.failures import DownloadFailed
from deepinfer_nb.hub.preflight import is_hub_id
from tests.fixtures.hub import REPO, HubDouble, smollm2_folder

GATED = "org/gated-smol"
TOKEN = "hf_test_token"
SIZE = sum(p.stat().st_size for p in smollm2_folder().iterdir() if not p.name.startswith("."))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubDouble]:
    folder = smollm2_folder()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubDouble(
        repos={REPO: folder, GATED: folder},
        gated={GATED: TOKEN},
        drop_after={"model.safetensors": 20_000_000},
    ) as server:
        yield server


def downloads(hub: HubDouble, tmp_path: Path) -> Downloads:
    return Downloads(node_id="vm", cache_dir=tmp_path / "hub", endpoint=hub.url)


def test_is_hub_id() -> None:
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert not is_hub_id("smollm2-135m-instruct")
    assert not is_hub_id("/models/qwen")
    assert not is_hub_id("./a/b")
    assert not is_hub_id("a/b/c")


def test_fetch_resumes_after_a_drop_then_is_cached(hub: HubDouble, tmp_path: Path) -> None:
    d = downloads(hub, tmp_path)
    assert d.cached(REPO, "main") is None
    progress = Progress()
    path = d.fetch(REPO, "main", progress)
    files = sorted(p.name for p in path.iterdir())
    assert files == sorted(hub.repos[REPO].files)
    assert (path / "model.safetensors").read_bytes()[:64] == (
        smollm2_folder() / "model.safetensors"
    ).read_bytes()[:64]
    # the connection was dropped after 20 MB and the download resumed there with a Range request
    gets = hub.file_gets("model.safetensors")
    assert gets == ["", "bytes=20000000-"]
    assert progress.total == SIZE and progress.done() == SIZE
    # cached: found without the hub, in milliseconds
    hub.reset_counters()
    started = time.perf_counter()
    assert d.fetch(REPO, "main", Progress()) == path
    assert time.perf_counter() - started < 0.5
    assert hub.requests == []


def test_two_fetches_of_one_repo_download_once(hub: HubDouble, tmp_path: Path) -> None:
    d = downloads(hub, tmp_path)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(d.fetch(REPO, "main", Progress())))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and results[0] == results[1]
    # one full GET, cut after 20 MB, and its resume: the second fetch waited and found it cached
    assert len(hub.file_gets("model.safetensors")) == 2
    assert hub.bytes_sent < SIZE + 20_000_000


def test_unknown_repo_is_permanent(hub: HubDouble, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed) as err:
        downloads(hub, tmp_path).fetch("nobody/no-such-model", "main", Progress())
    assert err.value.failure.permanent
    assert "nobody/no-such-model was not found on" in str(err.value)
    assert "HF_TOKEN" in str(err.value)


def test_unknown_revision_is_permanent(hub: HubDouble, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed) as err:
        downloads(hub, tmp_path).fetch(REPO, "v9.9", Progress())
    assert err.value.failure.permanent
    assert "revision 'v9.9'" in str(err.value)


def test_gated_needs_the_token(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = downloads(hub, tmp_path)
    with pytest.raises(DownloadFailed) as err:
        d.fetch(GATED, "main", Progress())
    assert err.value.failure.permanent
    assert "gated" in str(err.value) and "HF_TOKEN" in str(err.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadFailed) as err:
        d.fetch(GATED, "main", Progress())
    assert "has no access" in str(err.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = d.fetch(GATED, "main", Progress())
    assert (path / "config.json").is_file()


def test_offline_and_not_cached_is_permanent(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadFailed) as err:
        downloads(hub, tmp_path).fetch(REPO, "main", Progress())
    assert err.value.failure.permanent
    assert str(err.value).startswith(f"{REPO} is not cached on node vm and HF_HUB_OFFLINE is set")
    assert hub.requests == []


def test_unreachable_hub_and_not_cached_is_permanent(tmp_path: Path) -> None:
    with HubDouble(repos={}) as gone:
        url = gone.url  # a port nobody listens on once stopped
    d = Downloads(node_id="vm", cache_dir=tmp_path / "hub", endpoint=url)
    started = time.monotonic()
    with pytest.raises(DownloadFailed) as err:
        d.fetch("Qwen/Qwen2.5-7B-Instruct", "main", Progress())
    assert time.monotonic() - started < 5
    assert err.value.failure.permanent
    assert str(err.value) == (
        f"Qwen/Qwen2.5-7B-Instruct is not cached on node vm and the hub ({url}) is unreachable; "
        "download it on a machine with access (`huggingface-cli download "
        "Qwen/Qwen2.5-7B-Instruct`) and copy the cache to the node, or set HF_ENDPOINT to a "
        "mirror"
    )


def test_a_killed_download_resumes_in_the_next_process(tmp_path: Path) -> None:
    """A worker killed mid-download leaves the partial blob; the next fetch asks for the rest."""
    with HubDouble(repos={REPO: smollm2_folder()}, bytes_per_s=40e6) as hub:
        code = (
            "import sys; from pathlib import Path\n"
            "from deepinfer_nb.control.downloads import Downloads, Progress\n"
            "Downloads(node_id='vm', cache_dir=Path(sys.argv[1]), endpoint=sys.argv[2])"
            ".fetch(sys.argv[3], 'main', Progress())\n"
        )
        cache = tmp_path / "hub"
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(cache), hub.url, REPO],
            env={**os.environ, "PYTHONPATH": os.getcwd()},
            stderr=subprocess.DEVNULL,
        )
        blobs = cache / f"models--{REPO.replace('/', '--')}" / "blobs"
        deadline = time.monotonic() + 60
        partial = 0
        while time.monotonic() < deadline and partial < 40_000_000:
            parts = list(blobs.glob("*.deepinfer-partial"))
            partial = parts[0].stat().st_size if parts else 0
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert partial >= 40_000_000, "the child never got far enough"
        hub.reset_counters()
        path = downloads(hub, tmp_path).fetch(REPO, "main", Progress())
        assert (path / "model.safetensors").stat().st_size == (
            smollm2_folder() / "model.safetensors"
        ).stat().st_size
        (resume,) = hub.file_gets("model.safetensors")
        assert resume.startswith("bytes=") and int(resume[6:-1]) >= 30_000_000
        assert hub.bytes_sent < SIZE - 30_000_000


def test_a_cancelled_download_stops_soon_and_resumes_later(tmp_path: Path) -> None:
    """An engine stopped while Downloading: the thread stops at its next chunk, frees the
    repository's lock, and keeps the partial file for the next attempt."""
    with HubDouble(repos={REPO: smollm2_folder()}, bytes_per_s=40e6) as hub:
        d = downloads(hub, tmp_path)
        progress = Progress()
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                d.fetch(REPO, "main", progress)
            except BaseException as exc:  # the outcome is the assertion
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while progress.done() < 30_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        progress.cancel()
        cancelled_at = time.monotonic()
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - cancelled_at < 3
        assert [type(e) for e in outcome] == [Cancelled]
        hub.reset_counters()
        d.fetch(REPO, "main", Progress())  # not blocked by a lock, and resumes
        (resume,) = hub.file_gets("model.safetensors")
        assert int(resume[6:-1]) >= 30_000_000
