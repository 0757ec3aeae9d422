"""A stand-in engine process for launcher/worker unit tests (no vLLM, no gRPC).

Run as `fake_engine.py -m deepinfer_nb.engine ARGS...` through a wrapper "python". It prints its
argv and whether the auth token arrived, then behaves as FAKE_ENGINE_MODE says:
  sleep (default)  spawn a grandchild in the same process group, then sleep until signalled;
  ignore-term      the same, but ignore SIGTERM (the launcher must escalate to SIGKILL);
  fail             print the shim's one-line start-up failure and exit 1.
"""

import os
import signal
import subprocess
import sys
import time

mode = os.environ.get("FAKE_ENGINE_MODE", "sleep")
print("argv", " ".join(sys.argv[1:]), flush=True)
token_env = sys.argv[sys.argv.index("--auth-token-env") + 1]
print("token-length", len(os.environ.get(token_env, "")), flush=True)
print("kv-space", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "-"), flush=True)
if mode == "fail":
    print("deepinfer-nb engine: cannot start fake: boom", file=sys.stderr, flush=True)
    print("a later unrelated line", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("grandchild", child.pid, flush=True)
while True:
    time.sleep(1)
