"""The project's one exception tree, and the permanent/temporary split that decides every retry.

Every layer raises these; each boundary translates them in one table: gRPC status <-> exception in
`engine/status.py` (shim and client), exception -> HTTP status and OpenAI error type in
`gateway/errors.py`, exception -> `UsageError` in the magics (`nb/magics.py`), and etcd's gRPC
status -> exception in `store/etcd.py`.

Each class says whether it is temporary [T] or permanent [P] (kopf's TemporaryError and
PermanentError are the model): a temporary error means the same request may succeed if sent again,
later or to another replica, and sending it again does no harm; a permanent one would only fail
again. Retry loops (the gateway's replica retry, the etcd store's backoff, polling an engine until
READY) ask `is_temporary(exc)` and nothing else. Client-caused errors are all permanent.

    DeepInferError                   [P]
    ├── ConfigError                  [P] invalid settings file / environment / flag
    ├── ModelError                   [P] a model name or local build that cannot be resolved
    │   └── MissingDependencyError   [P] an optional package is not installed (names it)
    ├── RecordError                  [P] a stored value that is not a valid record (also ValueError)
    ├── DeploymentError              [P] a deployment that cannot make progress (says what to do)
    ├── PolicyError                  [P] the launch policy refuses a spec (names the rule)
    ├── RuntimeTimeoutError          [T] a call on the kernel's runtime loop ran past its timeout
    ├── StoreError                   [P] the metadata store refused the call
    │   ├── StoreUnavailableError    [T] unreachable, no leader, or a read timed out
    │   ├── RevisionCompactedError   [P] a watch asked for history that is gone: resync
    │   ├── LeaseLostError           [P] a lease expired or could not be refreshed
    │   └── NotLeaderError           [P] a fenced write: this controller is no longer leader
    └── EngineError                  [T] an engine fault (gRPC INTERNAL, UNKNOWN, ...)
        ├── EngineUnavailableError   [T] not reachable / still loading / draining
        ├── EngineTimeoutError       [T] the deadline passed
        ├── EngineStartError         [P] a shim exited or never became READY (log tail)
        ├── InvalidRequestError      [P] the request's arguments were rejected
        ├── UnsupportedTaskError     [P] the model serves another task (embed vs generate)
        ├── UnsupportedFeatureError  [P] this engine lacks a feature the request asks for
        ├── NotFoundError            [P] the engine knows no such thing (request, adapter)
        ├── AuthenticationError      [P] wrong or missing engine token (the gateway's, not
        │                                the HTTP client's: it is a 502 there)
        └── RequestCancelledError    [P] the request was cancelled
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "DeepInferError",
    "DeploymentError",
    "EngineError",
    "EngineStartError",
    "EngineTimeoutError",
    "EngineUnavailableError",
    "InvalidRequestError",
    "LeaseLostError",
    "MissingDependencyError",
    "ModelError",
    "NotFoundError",
    "NotLeaderError",
    "PolicyError",
    "RecordError",
    "RequestCancelledError",
    "RevisionCompactedError",
    "RuntimeTimeoutError",
    "StoreError",
    "StoreUnavailableError",
    "UnsupportedFeatureError",
    "UnsupportedTaskError",
    "is_temporary",
]


class DeepInferError(Exception):
    """Base of every error this package raises on purpose."""

    temporary: ClassVar[bool] = False
    """True: the same request may succeed if sent again (later, or to another replica)."""


def is_temporary(exc: BaseException) -> bool:
    """The one retry rule: only this package's temporary errors are worth sending again."""
    return isinstance(exc, DeepInferError) and exc.temporary


class ConfigError(DeepInferError):
    pass


class ModelError(DeepInferError):
    pass


class MissingDependencyError(ModelError):
    pass


class RecordError(DeepInferError, ValueError):
    """A stored value that is not a valid record of the expected type."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt record at {key}: {reason}")
        self.key = key
        self.reason = reason


class DeploymentError(DeepInferError):
    """A deployment that cannot make progress; the message says what to do next."""


class PolicyError(DeepInferError):
    """A deployment spec the launch policy refuses: permanent (fixing it needs a new spec)."""

    def __init__(self, rule: str, param: str, message: str) -> None:
        super().__init__(f"launch policy refused {param}: {message} (rule {rule})")
        self.rule = rule
        self.param = param


class RuntimeTimeoutError(DeepInferError):
    """A call submitted to the runtime loop did not finish within its timeout (it was cancelled)."""

    temporary = True


class StoreError(DeepInferError):
    pass


class StoreUnavailableError(StoreError):
    temporary = True


class RevisionCompactedError(StoreError):
    def __init__(self, message: str, *, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class LeaseLostError(StoreError):
    pass


class NotLeaderError(StoreError):
    """A fenced write failed because this controller is no longer the leader."""


class EngineError(DeepInferError):
    """An engine fault: another replica, or the same one later, may well answer."""

    temporary = True


class EngineUnavailableError(EngineError):
    pass


class EngineTimeoutError(EngineError):
    pass


class EngineStartError(EngineError):
    """A shim exited or did not become READY in time; the message carries its log's tail."""

    temporary = False


class InvalidRequestError(EngineError):
    temporary = False


class UnsupportedTaskError(EngineError):
    """The loaded model cannot serve this kind of request (e.g. embeddings on a chat model)."""

    temporary = False


class UnsupportedFeatureError(EngineError):
    """The engine backend lacks a feature the request asks for (gRPC UNIMPLEMENTED); the message
    names the feature."""

    temporary = False


class NotFoundError(EngineError):
    temporary = False


class AuthenticationError(EngineError):
    temporary = False


class RequestCancelledError(EngineError):
    temporary = False
