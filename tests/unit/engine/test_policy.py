"""The launch policy's rules, one refused input at a time, and what it still admits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from deepinfer_nb.config import AgentSettings
from deepinfer_nb.engine import policy
from deepinfer_nb.engine.policy import LaunchPolicy, PolicyError
from deepinfer_nb.models import DeploymentSpec


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    return root


def pol(models: Path, **kw: Any) -> LaunchPolicy:
    agent = AgentSettings(model_dirs=[str(models)], **kw)
    return LaunchPolicy.from_settings(agent)


def refusal(spec: DeploymentSpec, p: LaunchPolicy) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        policy.check(spec, p)
    return info.value


def spec(**kw: Any) -> DeploymentSpec:
    kw.setdefault("model", "Qwen/Qwen2.5-0.5B-Instruct")
    return DeploymentSpec(name="d", **kw)


@pytest.mark.parametrize(
    ("env", "rule"),
    [
        ({"LD_PRELOAD": "/tmp/evil.so"}, "env.never"),
        ({"LD_LIBRARY_PATH": "/tmp"}, "env.never"),
        ({"PYTHONPATH": "/tmp"}, "env.never"),
        ({"PYTHONSTARTUP": "/tmp/x.py"}, "env.never"),
        ({"PATH": "/tmp"}, "env.never"),
        ({"VLLM_PLUGINS": "x"}, "env.never"),
        ({"VLLM_LOGGING_CONFIG_PATH": "/tmp/log.json"}, "env.never"),
        ({"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, "env.never"),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "env.reserved"),
        ({"HF_TOKEN": "hf_x"}, "env.secret_in_clear"),
        ({"WANDB_API_KEY": "k"}, "env.secret_in_clear"),
        ({"FOO": "1"}, "env.not_allowed"),
    ],
)
def test_env_refusals_name_the_rule(env: dict[str, str], rule: str, models: Path) -> None:
    err = refusal(spec(env=env), pol(models))
    (name,) = env
    assert err.rule == rule and err.param == f"env.{name}"
    assert f"(rule {rule})" in str(err) and name in str(err)


def test_env_allowlist_and_worker_extension(models: Path) -> None:
    tunables = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "NCCL_DEBUG": "INFO",
        "OMP_NUM_THREADS": "2",
        "CUDA_LAUNCH_BLOCKING": "1",
        "LLAMA_ARG_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }
    policy.check(spec(env=tunables), pol(models))
    policy.check(spec(env={"FOO": "1"}), pol(models, allowed_env=["FOO"]))
    # a worker cannot admit what is never allowed, nor a secret in clear
    assert refusal(spec(env={"LD_PRELOAD": "x"}), pol(models, allowed_env=["LD_PRELOAD"])).rule
    err = refusal(spec(env={"HF_TOKEN": "x"}), pol(models, allowed_env=["HF_TOKEN"]))
    assert err.rule == "env.secret_in_clear"


def test_secret_references(models: Path) -> None:
    policy.check(spec(secrets=["HF_TOKEN", "WANDB_API_KEY"]), pol(models))
    for name in ("LD_PRELOAD", "OMP_NUM_THREADS", "PYTHON_TOKEN"):
        assert refusal(spec(secrets=[name]), pol(models)).rule == "secrets.name"


@pytest.mark.parametrize(
    ("args", "rule", "param"),
    [
        (["--trust-remote-code"], "args.code_loading", "engine_args.--trust-remote-code"),
        (["--worker-extension-cls", "evil.X"], "args.code_loading", None),
        (["--logits-processors", "a.B", "c.D"], "args.code_loading", None),
        (["--kv-transfer-config", "{}"], "args.code_loading", None),
        (["--logging-config", "/tmp/l.json"], "args.code_loading", None),
        (["--hf-token", "hf_x"], "args.secret_in_clear", None),
        (["--port", "1"], "args.unknown_flag", "engine_args.--port"),
        (["--config", "x.yaml"], "args.unknown_flag", None),
        (["--trust-remote"], "args.unknown_flag", None),  # argparse would expand it
        (["-O3"], "args.unknown_flag", None),
        (["--max-num-seqs", "8", "extra"], "args.positional", "engine_args"),
        (["--tokenizer", "/etc"], "path.outside_model_dirs", "engine_args.--tokenizer"),
        (["--download-dir=/tmp"], "path.outside_model_dirs", None),
    ],
)
def test_flag_refusals_name_the_rule(
    args: list[str], rule: str, param: str | None, models: Path
) -> None:
    err = refusal(spec(engine_args=args), pol(models))
    assert err.rule == rule and f"(rule {rule})" in str(err)
    if param:
        assert err.param == param


def test_documented_flags_pass_and_code_loading_needs_the_worker(models: Path) -> None:
    ok = [
        "--max-num-seqs",
        "8",
        "--max_num_batched_tokens=2048",  # vLLM reads underscores as dashes
        "--enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--kv-cache-dtype",
        "fp8",
        "-tp",
        "2",
        "--generation-config",
        "auto",
        "--tokenizer",
        "Qwen/Qwen2.5-0.5B-Instruct",  # a hub id, not a path
        "--tokenizer",
        str(models / "tiny"),
        "--no-trust-remote-code",
    ]
    policy.check(spec(engine_args=ok), pol(models))
    policy.check(spec(engine_args=["--trust-remote-code"]), pol(models, allow_code_loading=True))


def test_model_paths_must_resolve_inside_the_model_dirs(models: Path, tmp_path: Path) -> None:
    p = pol(models)
    policy.check(spec(model=str(models / "tiny")), p)
    policy.check(spec(model="smollm2-135m-instruct"), p)  # a catalog alias: built by the worker
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (models / "link").symlink_to(outside)  # inside by name, outside once resolved
    for model in ("/etc", str(models / "link"), str(models / ".." / "elsewhere"), "~"):
        err = refusal(spec(model=model), p)
        assert err.rule == "path.outside_model_dirs" and err.param == "model", model
    # a relative path the worker can see is a local path too (vLLM loads it before the hub)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert refusal(spec(model="elsewhere"), p).rule == "path.outside_model_dirs"
    finally:
        os.chdir(cwd)


def test_every_violation_is_listed(models: Path) -> None:
    bad = spec(env={"LD_PRELOAD": "x", "FOO": "1"}, engine_args=["--trust-remote-code"])
    assert [v.rule for v in policy.violations(bad, pol(models))] == [
        "env.never",
        "env.not_allowed",
        "args.code_loading",
    ]


def test_resolve_secrets_env_then_file() -> None:
    text = "# comment\nHF_TOKEN='from-file'\nOTHER_TOKEN=x\n"
    got = policy.resolve_secrets(["HF_TOKEN"], env={}, file_text=text, file_name="s.env")
    assert got == {"HF_TOKEN": "from-file"}
    got = policy.resolve_secrets(["HF_TOKEN"], env={"HF_TOKEN": "env"}, file_text=text)
    assert got == {"HF_TOKEN": "env"}
    with pytest.raises(PolicyError, match=r"no WANDB_API_KEY in its environment or s\.env"):
        policy.resolve_secrets(["WANDB_API_KEY"], env={}, file_text=text, file_name="s.env")


def test_redaction() -> None:
    args = ["--max-num-seqs", "8", "--hf-token", "hf_secret", "--hf_token=hf_other"]
    assert policy.redact_args(args) == [
        "--max-num-seqs",
        "8",
        "--hf-token",
        "***",
        "--hf_token=***",
    ]
    assert policy.redact_text("auth hf_secret failed (hf_secret)", ["hf_secret", ""]) == (
        "auth *** failed (***)"
    )
