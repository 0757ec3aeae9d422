"""Failure classes: the one place that decides whether an engine's failure is permanent (Failed at
once, never restarted, one line saying what to do) or transient (Failed, then restarted with
backoff as the controller's budget allows).

Permanent (nothing changes by trying again):

- the repository or revision is not on the hub;
- the repository is gated or private and the worker has no (valid) HF_TOKEN;
- the model is not cached on the node and the hub is unreachable (or HF_HUB_OFFLINE is set);
- the model's architecture is not supported by the engine;
- invalid engine arguments (the shim exits with code 2) or a model that is not found locally;
- vLLM missing from the engine's Python;
- the model is larger than any node (decided before anything is written: see `fit.py`).

Transient (everything else): a crash or OOM kill after start, a failed health check, a network
error or hub 5xx during a download (the next attempt resumes the partial files).
"""

from __future__ import annotations

import dataclasses

from ..errors import DeepInferError

__all__ = ["DownloadFailed", "Failure", "from_download", "from_engine_exit", "not_cached"]

BAD_ARGS_EXIT = 2
"""The shim's exit code for arguments it (or vLLM's parser) rejects."""
PERMANENT_CAUSES = (
    "model not found",
    "bad engine args",
    "is not installed for",
    "cannot be imported for",
    "are not supported for now",
    "is not supported",
)
"""Substrings of the shim's one-line start-up failure that no restart can fix."""


@dataclasses.dataclass(frozen=True)
class Failure:
    message: str
    permanent: bool


class DownloadFailed(DeepInferError):
    """A hub download that did not complete; `failure` says how and whether to retry."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def not_cached(*, repo: str, node: str, endpoint: str, offline: bool) -> Failure:
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({endpoint}) is unreachable"
    return Failure(
        f"{repo} is not cached on node {node} and {why}; download it on a machine with access "
        f"(`huggingface-cli download {repo}`) and copy the cache to the node, or set HF_ENDPOINT "
        "to a mirror",
        permanent=True,
    )


def from_download(
    exc: BaseException,
    *,
    repo: str,
    revision: str,
    node: str,
    endpoint: str,
    token_set: bool,
    planned: bool,
) -> Failure:
    """Classify an exception from huggingface_hub. `planned`: the hub answered the file listing
    before this failed (so a network error now is a blip mid-download, not "no hub")."""
    from huggingface_hub import errors as hf

    # huggingface_hub wraps the hub's answer (DryRunError, LocalEntryNotFoundError ... from it).
    chain = _chain(exc)
    exc = next(
        (e for e in chain if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError))),
        exc,
    )
    if isinstance(exc, hf.GatedRepoError):
        if token_set:
            text = (
                f"{repo} is gated and the HF_TOKEN of node {node} has no access to it: accept "
                "its terms on the hub with that account, or give the worker another HF_TOKEN"
            )
        else:
            text = (
                f"{repo} is gated: accept its terms on the hub and set HF_TOKEN in the worker's "
                f"environment on node {node}"
            )
        return Failure(text, permanent=True)
    if isinstance(exc, hf.RevisionNotFoundError):
        return Failure(
            f"revision {revision!r} of {repo} does not exist on {endpoint}: use a branch, tag "
            "or commit of the repository (the `revision` field)",
            permanent=True,
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        hint = "" if token_set else " (private? set HF_TOKEN in the worker's environment)"
        return Failure(
            f"{repo} was not found on {endpoint}{hint}: check the model id", permanent=True
        )
    offline = isinstance(exc, hf.OfflineModeIsEnabled)
    if not planned and (offline or _unreachable(exc)):
        return not_cached(repo=repo, node=node, endpoint=endpoint, offline=offline)
    return Failure(f"download of {repo} failed (will retry): {_first_line(exc)}", permanent=False)


def from_engine_exit(cause: str, *, exit_code: int | None) -> Failure:
    """Classify an engine that exited before or after becoming ready."""
    low = cause.lower()
    permanent = exit_code == BAD_ARGS_EXIT or any(p in low for p in PERMANENT_CAUSES)
    return Failure(cause, permanent=permanent)


def _unreachable(exc: BaseException) -> bool:
    """A connection that never happened (refused, DNS, timeout), anywhere in the chain."""
    from huggingface_hub import errors as hf

    unreachable = (hf.LocalEntryNotFoundError, ConnectionError, TimeoutError)
    names = ("ConnectError", "ConnectTimeout", "TimeoutException")
    return any(isinstance(e, unreachable) or type(e).__name__ in names for e in _chain(exc))


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
