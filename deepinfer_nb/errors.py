"""The project's exception tree. Every layer raises these; each boundary translates them once
(gRPC status in the shim, OpenAI error JSON in the gateway, UsageError in the magics).

    DeepInferError
    ├── ConfigError              invalid settings file / environment / flag
    ├── ModelError               a model name or local build that cannot be resolved
    │   └── MissingDependencyError   an optional package is not installed (names it)
    ├── StoreError               the metadata store
    │   ├── StoreUnavailableError    endpoint unreachable past the retry deadline
    │   ├── RevisionCompactedError   a watch asked for history that is gone: resync
    │   └── LeaseLostError           a lease expired or could not be refreshed
    ├── SchedulingError          (NoFit is a value, not an exception; this is for misuse)
    └── EngineError              talking to an engine shim
        ├── EngineUnavailableError   not reachable / not ready / draining
        ├── InvalidRequestError      the engine rejected the request's arguments
        ├── AuthenticationError      wrong or missing engine token
        ├── RequestCancelledError    the request was cancelled
        └── EngineTimeoutError       the deadline passed
"""

from __future__ import annotations


class DeepInferError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DeepInferError):
    pass


class ModelError(DeepInferError):
    pass


class MissingDependencyError(ModelError):
    pass


class StoreError(DeepInferError):
    pass


class StoreUnavailableError(StoreError):
    pass


class RevisionCompactedError(StoreError):
    def __init__(self, message: str, *, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class LeaseLostError(StoreError):
    pass


class SchedulingError(DeepInferError):
    pass


class EngineError(DeepInferError):
    pass


class EngineUnavailableError(EngineError):
    pass


class InvalidRequestError(EngineError):
    pass


class AuthenticationError(EngineError):
    pass


class RequestCancelledError(EngineError):
    pass


class EngineTimeoutError(EngineError):
    pass
