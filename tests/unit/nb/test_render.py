"""Pure pieces of the notebook layer: specs from deploy(), stages, hints, tables, links."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepinfer_nb.client import cluster as api
from deepinfer_nb.client import render, view
from deepinfer_nb.client.view import Snapshot
from deepinfer_nb.config import AgentSettings
from deepinfer_nb.models import (
    DeploymentSpec,
    Engine,
    EngineState,
    GpuInfo,
    GpuProcess,
    GpuSamples,
    Node,
    WarmPoolStatus,
)
from deepinfer_nb.nb.magics import _Progress
from deepinfer_nb.nb.widgets import sparkline
from deepinfer_nb.snippets import snippet


def snap(engines: list[Engine], *, replicas: int = 1, nodes=None, gpus=None) -> Snapshot:
    return Snapshot(
        deployments={"d": DeploymentSpec(name="d", model="m", replicas=replicas)},
        engines={e.id: e for e in engines},
        nodes=nodes or {},
        gpus=gpus or {},
        revision=1,
    )


def test_build_spec_leaves_defaults_to_the_spec_layer_and_passes_extra_args() -> None:
    spec = api.build_spec(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        name=None,
        gpus=0,
        replicas=2,
        device="cpu",
        engine_args={"max_num_seqs": 4, "trust_remote_code": True},
    )
    assert spec.name == "smollm2-135m-instruct"
    # unset, as over HTTP: defaults.effective() decides per device, for every entry point
    assert (spec.dtype, spec.enforce_eager, spec.max_model_len) == ("auto", None, None)
    assert spec.env == {}
    assert spec.engine_args == ["--max-num-seqs", "4", "--trust-remote-code"]
    gpu = api.build_spec("m", name="x", gpus=2, replicas=1, device="auto", engine_args={})
    assert (gpu.device, gpu.tensor_parallel_size) == ("cuda", 2)
    with pytest.raises(api.DeploymentError, match="invalid deployment name"):
        api.build_spec("m", name="Bad Name", gpus=0, replicas=1, device="cpu", engine_args={})


def test_stages_and_status() -> None:
    e0 = Engine(id="d-0-a", deployment="d", replica=0, state=EngineState.RUNNING)
    e1 = Engine(id="d-1-b", deployment="d", replica=1, state=EngineState.STARTING)
    assert view.stage_of([e0, e1], 2) == "Starting"
    assert view.stage_of([e0], 2) == "Pending"
    assert view.status_of(snap([e0, e1], replicas=2), "d") == "Starting 1/2"
    failed = e1.model_copy(update={"state": EngineState.FAILED, "error": "CUDA OOM"})
    assert view.status_of(snap([e0, failed], replicas=2), "d") == "Failed 1/2: CUDA OOM"


def test_downloading_is_listed_only_for_what_can_download(tmp_path: Path) -> None:
    S = EngineState
    scheduled = Engine(id="d-0-a", deployment="d").transition(S.SCHEDULED)
    local = view.stages([scheduled], may_download=False)
    assert local == [S.PENDING, S.SCHEDULED, S.STARTING, S.RUNNING]
    hub = [S.PENDING, S.SCHEDULED, S.DOWNLOADING, S.STARTING, S.RUNNING]
    assert view.stages([scheduled], may_download=True) == hub
    # an engine that is, or was, Downloading names the stage even when it was not foreseen
    downloading = scheduled.transition(S.DOWNLOADING)
    assert view.stages([downloading], may_download=False) == hub
    assert view.stages([downloading.transition(S.STARTING)], may_download=False) == hub
    line = render.progress_text("d", "Starting", 3.21, local, "d-0-a on vm")
    assert line == "d: Starting (3.2 s) [Pending -> Scheduled -> Starting -> Running] d-0-a on vm"
    assert "Downloading" in repr(_Progress("d", "Downloading", 1.0, "", hub))
    progress = _Progress("d", "Starting", 1.0, "", local)
    assert "Downloading" not in repr(progress) + progress._repr_html_()

    # which models can download: hub ids not in this host's hub cache, never local ones
    agent = AgentSettings(hub_cache=str(tmp_path))
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert not view.may_download("org/tiny", "main", agent)  # cached
    assert view.may_download("org/other", "main", agent)
    assert not view.may_download("smollm2-135m-instruct", "main", agent)  # a local alias
    assert not view.may_download(str(tmp_path), "main", agent)  # a folder


def test_waiter_reports_stages_and_failures() -> None:
    seen: list[str] = []
    waiter = api.Waiter("d", lambda stage, _t, _e: seen.append(stage))
    pending = Engine(id="d-0-a", deployment="d")
    assert not waiter(snap([pending]))
    assert waiter(snap([pending.transition(EngineState.RUNNING)]))
    assert seen == ["Pending", "Running"]
    failed = pending.model_copy(update={"state": EngineState.FAILED, "error": "boom\nexit 1"})
    with pytest.raises(api.DeploymentError, match=r"failed: exit 1; it restarts automatically"):
        api.Waiter("d", None)(snap([failed]))


def test_nofit_hints() -> None:
    assert api.nofit_hint("GPU 1 has 3.1 GiB free, needs 21 GiB").endswith(
        "try --device cpu or a smaller model"
    )
    assert "start a worker" in api.nofit_hint("no nodes registered")
    said = "no worker node is registered; start one with `deepinfer-nb worker`"
    assert api.nofit_hint(said) == said


def test_gpu_rows_explain_missing_gpus() -> None:
    nodes = {"a": Node(id="a", gpu_error="no NVIDIA driver"), "b": Node(id="b")}
    gpus = {
        "b": GpuSamples(
            node="b",
            gpus=[
                GpuInfo(
                    index=0,
                    name="H100",
                    memory_total=80 << 30,
                    memory_used=8 << 30,
                    utilization=50.0,
                    processes=[
                        GpuProcess(pid=77, used_memory=1 << 29),
                        GpuProcess(pid=12, used_memory=3 << 30, engine="d-0-a", deployment="d"),
                        GpuProcess(pid=13, used_memory=1 << 30, engine="d-0-a", deployment="d"),
                        GpuProcess(pid=78),
                    ],
                )
            ],
        )
    }
    e = Engine(id="d-0-a", deployment="d", state=EngineState.RUNNING, node="b", gpus=[0])
    rows = render.gpu_rows(snap([e], nodes=nodes, gpus=gpus))
    assert rows[0]["note"] == "no NVIDIA GPU on node a (no NVIDIA driver)"
    assert (rows[1]["name"], rows[1]["mem used GiB"], rows[1]["booked"]) == ("H100", 8.0, "d-0-a")
    # what runs: the engine's two processes summed, then each unknown pid (memory where known)
    assert rows[1]["processes"] == "d-0-a 4.00 GiB, unknown pid 77 0.50 GiB, unknown pid 78"


def test_gpus_and_doctor_show_the_warm_pool_and_its_memory() -> None:
    from deepinfer_nb.client.doctor import _pool_checks

    pool = WarmPoolStatus(size=1, warm=1, memory_bytes=3 << 29, pids=[42])
    gpus = {"cpu": GpuSamples(node="cpu", warm_pool=pool), "none": GpuSamples(node="none")}
    view = snap([], nodes={"cpu": Node(id="cpu"), "none": Node(id="none")}, gpus=gpus)
    rows = render.gpu_rows(view)
    assert rows[0]["note"] == "no NVIDIA GPU on node cpu · warm pool: 1 ready, 1.5 GiB"
    assert "warm pool" not in rows[1]["note"]
    (check,) = _pool_checks(view)
    assert (check.name, check.detail) == ("warm pool on cpu", "warm pool: 1 ready, 1.5 GiB")


def test_tables_escape_and_colour() -> None:
    e = Engine(id="d-0-a", deployment="d", state=EngineState.FAILED, error="<oops>")
    html = render.engines_html(snap([e]))
    assert "&lt;oops&gt;" in html and render.STATE_COLOURS[EngineState.FAILED] in html
    assert "Failed" in render.engines_text(snap([e]))


def test_snippets() -> None:
    py = snippet(lang="python", api_base="http://127.0.0.1:8082/v1", model="demo", key_env="GW_KEY")
    compile(py, "<snippet>", "exec")
    assert "base_url='http://127.0.0.1:8082/v1'" in py and 'os.environ["GW_KEY"]' in py
    curl = snippet(lang="curl", api_base="http://h/v1", model="demo", key_env="")
    assert curl.startswith("curl -s http://h/v1/chat/completions") and '"model": "demo"' in curl
    note = "GW_KEY: the key 'api-key', which can also create and delete deployments"
    for lang in ("python", "curl"):
        code = snippet(lang=lang, api_base="x", model="m", key_env="GW_KEY", key_note=note)
        assert code.startswith(f"# {note}\n")
    compile(snippet(lang="python", api_base="x", model="m", key_note=note), "<snippet>", "exec")


def test_snippets_behind_a_jupyter_proxy_send_the_token() -> None:
    # the token alone: it is the API key (Jupyter reads `Authorization: Bearer`)
    py = snippet(lang="python", api_base="http://h/p/v1", model="m", token_env="JUPYTER_TOKEN")
    compile(py, "<snippet>", "exec")
    assert 'api_key=os.environ["JUPYTER_TOKEN"])' in py and "# JUPYTER_TOKEN:" in py
    curl = snippet(lang="curl", api_base="http://h/p/v1", model="m", token_env="JUPYTER_TOKEN")
    assert '-H "Authorization: token $JUPYTER_TOKEN"' in curl
    # with a gateway key the key takes the header and the token the query
    py = snippet(lang="python", api_base="x", model="m", key_env="K", token_env="JUPYTER_TOKEN")
    compile(py, "<snippet>", "exec")
    assert 'api_key=os.environ["K"], default_query={"token": os.environ["JUPYTER_TOKEN"]}' in py
    curl = snippet(lang="curl", api_base="x", model="m", key_env="K", token_env="JUPYTER_TOKEN")
    assert 'curl -s "x/chat/completions?token=$JUPYTER_TOKEN"' in curl and "Bearer $K" in curl


def test_sparkline() -> None:
    assert sparkline([0.0, 50.0, 100.0, None]) == "▁▄█ "


def test_download_progress_reaches_wait_and_the_tables() -> None:
    from deepinfer_nb.models import DownloadProgress, EngineSettings

    def downloading(done: int) -> Engine:
        return Engine(
            id="d-0-a",
            deployment="d",
            state=EngineState.DOWNLOADING,
            node="vm",
            download=DownloadProgress(repo="org/m", done=done, total=200_000_000, rate=4e7),
        )

    seen: list[str] = []
    waiter = api.Waiter("d", lambda stage, _t, engines: seen.append(stage))
    for done in (0, 50_000_000, 100_000_000):
        assert not waiter(snap([downloading(done)]))
    assert seen == ["Downloading"] * 3  # every byte count redraws the progress in place
    row = render.engine_row(downloading(100_000_000))
    assert row["progress"] == "downloading 100.0/200.0 MB (50%) at 40.0 MB/s"
    settings = EngineSettings(
        device="cpu", dtype="float32", enforce_eager=True, mode="eager", max_model_len=2048
    )
    running = Engine(
        id="d-0-a", deployment="d", state=EngineState.RUNNING, node="vm", settings=settings
    )
    assert render.engine_row(running)["settings"] == "float32 · eager · context 2048"
    assert "float32 · eager · context 2048" in render.deployment_text(snap([running]), "d")
