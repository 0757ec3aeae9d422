"""gRPC core settings for deepinfer-nb's processes, set before `grpc` is first imported.

gRPC reads `GRPC_EXPERIMENTS` once, when `grpc` is imported, so the package's `__init__`
imports this module before anything else. It turns off the EventEngine TCP client and listener
(on by default in current gRPC) and so brings back iomgr's TCP path, still supported by gRPC:
there the thread that polls the asyncio completion queue reads the socket itself, instead of
taking each message from an EventEngine thread. Measured here (grpcio 1.85, 2 cores, a shim on
a fake engine, alternating runs), CPU per one-token unary call: client 0.25-0.36 ms against
0.33-0.55 ms with EventEngine, shim 0.49-0.75 against 0.61-0.97 ms; the gateway's CPU per
streamed token about 15% lower (138-155 against 167-183 us at 16 streams).

A `GRPC_EXPERIMENTS` the user set is left alone, and nothing changes when `grpc` was imported
before deepinfer_nb. Processes started from here (the engine shims among them) inherit it.
"""

from __future__ import annotations

import os
import sys

EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def apply() -> None:
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
