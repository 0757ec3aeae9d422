"""The worker agent of one node: registers it, runs the engines placed on it, keeps them running.

    worker = Worker(store, node_id="w1", settings=Settings())
    await worker.start()          # register under a lease, re-adopt, watch, launch
    worker.logs("chat-0-ab12")    # last lines of an engine's output
    await worker.stop()           # drain: stop engines, revoke the lease (node deregistered)

`nodes/{node}` (inventory) and `nodes/{node}/gpus` (samples every `gpu_sample_interval_s`) are
bound to the worker's lease, refreshed by the store's keepalive: if the worker dies, both vanish
within `heartbeat_ttl_s` and the controller re-places its engines.

Engine records are followed with `store.follow` (a watch, re-read when compacted). For each record a
pure `decide_local()` says what this node must do with it; one supervisor task per launched engine
then claims it (CAS Scheduled -> Downloading for a hub model not yet in the node's cache, else
Scheduled -> Starting, so no engine starts twice), downloads it (`downloads.py`; bytes done/total
and rate written to the record about once a second, then Downloading -> Starting), launches the
shim, waits for HealthCheck READY (Starting -> Running), and watches exit and health until it
fails (-> Failed with the cause and `next_restart_at`; `permanent` when `hub/failures.py` says no
restart can help). Every write is read-modify-CAS and re-decided
on conflict. A per-engine lock keeps the supervisor's writes and the reconciler's kills apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import importlib.util
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from .. import gpu, specs
from .._proto import engine_service_pb2 as pb
from .._version import __version__
from ..config import Settings
from ..defaults import effective
from ..engine import policy
from ..engine.client import EngineClient
from ..engine.cpu_dtype import best_cpu_dtype
from ..engine.process import poll_ready
from ..errors import EngineError, StoreError
from ..hub.failures import DownloadFailed, from_engine_exit
from ..hub.preflight import is_hub_id
from ..logs import ContextAdapter, bind
from ..models import (
    DeploymentSpec,
    DownloadProgress,
    Engine,
    EngineState,
    GpuInfo,
    GpuSamples,
    Node,
    WorkerMetrics,
)
from ..store import (
    Lease,
    MetaStore,
    RangeResult,
    WatchEvent,
    decode_record,
    decode_records,
    keys,
)
from ..store.follow import follow
from .downloads import Cancelled, Downloads, Progress
from .launcher import EngineProcess, Launcher, LogTail
from .metrics import WorkerCounters
from .reconcile import Backoff
from .warmpool import WarmPool, pool_env, resolve_size

__all__ = ["LocalAction", "Worker", "decide_local"]

log = logging.getLogger(__name__)
S = EngineState

STORE_RETRY_S = 30.0
"""How long a record write keeps retrying while the store is unreachable (not once stopping)."""
EXIT_POLL_S = 0.5
READY_POLL_S = 0.25
PROGRESS_S = 1.0
"""How often a download's progress is written to the engine record."""
"""How often a starting engine is asked whether it is ready (loopback; cheap)."""
MAX_REASON = 500


class LocalAction(str, enum.Enum):
    NOTHING = "nothing"
    START = "start"  # claim and launch
    KILL = "kill"  # stop our process; the record is not ours to write
    STOP = "stop"  # stop our process, then Stopping -> Stopped
    MARK_GONE = "mark_gone"  # Starting/Running here, but no process: -> Failed


def decide_local(record: Engine | None, *, node_id: str, has_local: bool) -> LocalAction:
    """What node `node_id` does about one engine record (None: deleted), given whether it holds
    a process (or a supervisor about to launch one) for it. Pure."""
    if record is None or record.node != node_id:
        return LocalAction.KILL if has_local else LocalAction.NOTHING
    state = record.state
    if state == S.SCHEDULED:
        return LocalAction.NOTHING if has_local else LocalAction.START
    if state in (S.DOWNLOADING, S.STARTING, S.RUNNING):
        return LocalAction.NOTHING if has_local else LocalAction.MARK_GONE
    if state == S.STOPPING:
        return LocalAction.STOP
    # Pending, Stopped, Failed, Lost (e.g. after a partition): nothing may run here.
    return LocalAction.KILL if has_local else LocalAction.NOTHING


@dataclasses.dataclass
class _Local:
    """What this worker holds for one engine."""

    proc: EngineProcess | None = None
    token: str = ""
    task: asyncio.Task[None] | None = None
    running: bool = False
    """Already recorded Running (a re-adopted engine): no Starting -> Running to write."""
    secrets: tuple[str, ...] = ()
    """Secret values handed to the process: redacted from every cause written or logged."""


class Worker:
    def __init__(
        self,
        store: MetaStore,
        *,
        node_id: str,
        settings: Settings | None = None,
        advertise_host: str = "127.0.0.1",
        engine_python: str | None = None,
        home: Path | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.settings = settings or Settings()
        self.agent = self.settings.agent
        self.advertise_host = advertise_host
        self.launcher = Launcher(
            node_id=node_id, home=home, engine_python=engine_python or self.agent.engine_python
        )
        self.downloads = Downloads(
            node_id=node_id,
            cache_dir=Path(self.agent.hub_cache).expanduser() if self.agent.hub_cache else None,
            endpoint=self.agent.hub_endpoint,
        )
        self.policy = policy.LaunchPolicy.from_settings(self.agent)
        self.backoff = Backoff(
            self.settings.scheduler.restart_backoff_s, self.settings.scheduler.restart_backoff_max_s
        )
        self.log = bind(log, node=node_id)
        self._records: dict[str, Engine] = {}
        self._local: dict[str, _Local] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirty: set[str] = set()
        self._reconcilers: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._lease: Lease | None = None
        self._stopping = False
        self._started = False
        self._gpu_count = 0
        self.pool: WarmPool | None = None
        self.counters = WorkerCounters()

    # ---- public API ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Register the node, re-adopt or clean up earlier engines, start the loops."""
        self.launcher.acquire()
        try:
            await self._register()
            # Adopt before deciding anything: a Running record of ours without its process
            # adopted yet would otherwise be marked Failed.
            revision = await self._read_engines()
            await self._adopt()
        except BaseException:
            self.launcher.release()
            raise
        self._started = True
        await self._start_pool()
        for eid in {*self._records, *self._local}:
            self._kick(eid)
        self._loops = [
            asyncio.create_task(
                follow(
                    self.store,
                    keys.ENGINES,
                    on_snapshot=self._apply_snapshot,
                    on_event=self._apply_event,
                    start_revision=revision,
                    name=f"worker {self.node_id}",
                )
            ),
            asyncio.create_task(self._tick_loop()),
            asyncio.create_task(self._sample_loop()),
        ]
        self.log.info(
            "worker started (advertise %s, engine python %s)",
            self.advertise_host,
            self.launcher.python,
        )

    async def stop(self, *, stop_engines: bool = True) -> None:
        """Drain: stop the loops; with `stop_engines`, stop every engine and revoke the lease
        (deregistering the node). Without, engines keep running for a restarted worker to
        re-adopt and the lease is left to expire."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        tasks = [*self._loops, *self._reconcilers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.pool is not None:
            await self.pool.stop()
        if stop_engines:
            await asyncio.gather(*(self._drain(eid) for eid in list(self._local)))
        else:
            for local in self._local.values():
                if local.task is not None:
                    local.task.cancel()
            await asyncio.gather(
                *(lc.task for lc in self._local.values() if lc.task), return_exceptions=True
            )
        lease, self._lease = self._lease, None
        self.counters.lease_replaced(lease)
        if lease is not None:
            try:
                if stop_engines:
                    await lease.revoke()
                else:
                    lease.stop_keepalive()
            except StoreError as exc:
                self.log.warning("could not revoke the node lease: %s", exc)
        self.launcher.release()
        self.log.info("worker stopped")

    def logs(self, engine_id: str, lines: int = 100) -> list[str]:
        """The last `lines` lines of an engine's output (from its log file once it is gone)."""
        proc = self.launcher.processes.get(engine_id)
        if proc is not None:
            return proc.tail.lines(lines)
        path = self.launcher.log_path(engine_id)
        size = path.stat().st_size if path.exists() else 0
        return LogTail(path, offset=max(0, size - 256 * 1024)).lines(lines)

    def log_path(self, engine_id: str) -> Path:
        """Where this node writes the engine's output (the gateway's log route reads it)."""
        return self.launcher.log_path(engine_id)

    def metrics(self) -> WorkerMetrics:
        return self.counters.snapshot(
            node=self.node_id, lease=self._lease, engines=len(self.launcher.processes)
        )

    @property
    def engines(self) -> dict[str, EngineProcess]:
        """The engine processes this worker holds now, by engine id."""
        return dict(self.launcher.processes)

    # ---- warm pool ----------------------------------------------------------------------------

    def _pool_size(self) -> int:
        """`[agent] warm_pool`, auto resolved: a pool on a node without GPUs whose engine Python
        is this one and has vLLM (another Python is not probed: only an explicit size counts)."""
        setting = self.agent.warm_pool
        same = os.path.realpath(self.launcher.python) == os.path.realpath(sys.executable)
        has_vllm = importlib.util.find_spec("vllm") is not None if same else setting > 0
        return resolve_size(setting, gpus=self._gpu_count, has_vllm=has_vllm)

    async def _start_pool(self) -> None:
        size = self._pool_size()
        if size <= 0:
            return
        self.pool = WarmPool(
            size=size,
            python=self.launcher.python,
            env=lambda: pool_env(os.environ),
            log_dir=self.launcher.log_dir,
            die_with_parent=self.launcher.die_with_parent,
            busy=lambda: any(not local.running for local in self._local.values()),
        )
        await self.pool.start()
        self.log.info("warm pool of %d engine process(es)", size)

    def _samples(self, devices: list[GpuInfo], reason: str) -> GpuSamples:
        pool = self.pool.status() if self.pool is not None else None
        return GpuSamples(node=self.node_id, gpus=devices, error=reason, warm_pool=pool)

    # ---- node registration and GPU samples ----------------------------------------------------

    async def _register(self) -> None:
        devices, reason = await asyncio.to_thread(self._probe)
        lease = await self.store.grant_lease(max(1, int(self.agent.heartbeat_ttl_s)))
        node = Node(
            id=self.node_id,
            host=socket.gethostname(),
            advertise_host=self.advertise_host,
            cpu_count=os.cpu_count() or 0,
            memory_total=psutil.virtual_memory().total,
            gpus=devices,
            gpu_error=reason,
            cpu_dtype=best_cpu_dtype(),
            version=__version__,
        )
        await self.store.put(keys.node(self.node_id), node.encode(), lease=lease.id)
        self._gpu_count = len(devices)
        samples = self._samples(devices, reason)
        await self.store.put(keys.node_gpus(self.node_id), samples.encode(), lease=lease.id)
        self.counters.lease_replaced(self._lease)
        self._lease = lease
        lease.on_lost(self._on_lease_lost)
        self.log.info(
            "registered node (%d GPU(s)%s, lease ttl %ds)",
            len(devices),
            f": {reason}" if reason else "",
            lease.ttl,
        )

    def _on_lease_lost(self) -> None:
        if self._stopping:
            return
        # The controller will mark our engines Lost and the reconciler then kills them; the node
        # comes back under a new lease so it can be used again.
        self.log.warning("node lease lost; registering again")
        self.counters.lease_losses += 1
        self._loops.append(asyncio.create_task(self._reregister()))

    async def _reregister(self) -> None:
        while not self._stopping:
            try:
                await self._register()
                return
            except StoreError as exc:
                self.log.warning("registering again failed (retrying): %s", exc)
                await asyncio.sleep(1.0)

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.agent.gpu_sample_interval_s)
            lease = self._lease
            if lease is None or lease.lost:
                continue
            devices, reason = await asyncio.to_thread(self._probe)
            samples = await asyncio.to_thread(self._samples, devices, reason)
            try:
                await self.store.put(keys.node_gpus(self.node_id), samples.encode(), lease=lease.id)
            except StoreError as exc:
                self.log.warning("publishing GPU samples failed: %s", exc)

    def _probe(self) -> tuple[list[GpuInfo], str]:
        """The GPUs, each process on them matched to the local engine whose tree holds it (a
        thread: NVML and /proc reads block)."""
        devices, reason = gpu.probe()
        if any(d.processes for d in devices):
            roots = {
                proc.pid: (eid, self._deployment_of(eid))
                for eid, proc in list(self.launcher.processes.items())
            }
            devices = gpu.join_processes(devices, gpu.process_owners(roots))
        return devices, reason

    def _deployment_of(self, eid: str) -> str:
        record = self._records.get(eid)
        return record.deployment if record is not None else ""

    # ---- following the records ----------------------------------------------------------------

    async def _read_engines(self) -> int:
        """The first snapshot, before adoption: records only, nothing re-decided yet."""
        result = await self.store.range(keys.ENGINES)
        self._apply_snapshot(result, kick=False)
        return result.revision

    def _apply_snapshot(self, result: RangeResult, *, kick: bool = True) -> None:
        records = decode_records(Engine, result.items, keys.ENGINES)
        gone = set(self._records) - set(records)
        self._records = records
        if kick:
            for eid in {*records, *gone, *self._local}:
                self._kick(eid)

    def _apply_event(self, event: WatchEvent) -> None:
        eid = keys.name_of(event.key, keys.ENGINES)
        if not eid:
            return
        record = decode_record(Engine, event.key, event.value) if event.value else None
        if record is None:
            self._records.pop(eid, None)
        else:
            self._records[eid] = record
        self._kick(eid)

    async def _tick_loop(self) -> None:
        """Level-triggered safety net: re-decide everything every reconcile interval."""
        while True:
            await asyncio.sleep(self.agent.reconcile_interval_s)
            for eid in {*self._records, *self._local}:
                self._kick(eid)

    def _kick(self, eid: str) -> None:
        """Re-decide `eid` soon; decisions for one engine run one at a time, coalesced."""
        if self._stopping:
            return
        self._dirty.add(eid)
        task = self._reconcilers.get(eid)
        if task is None or task.done():
            self._reconcilers[eid] = asyncio.create_task(self._reconcile_loop(eid))

    async def _reconcile_loop(self, eid: str) -> None:
        while eid in self._dirty:
            self._dirty.discard(eid)
            try:
                await self._reconcile(eid)
            except StoreError as exc:
                self.log.warning(
                    "engine %s: store error (next tick retries): %s",
                    eid,
                    exc,
                    extra={"engine": eid},
                )
            except Exception:
                self.log.exception("engine %s: reconcile failed", eid, extra={"engine": eid})

    async def _reconcile(self, eid: str) -> None:
        async with self._lock(eid):
            record = self._records.get(eid)
            action = decide_local(record, node_id=self.node_id, has_local=eid in self._local)
            if action == LocalAction.NOTHING:
                return
            elog = bind(self.log, engine=eid)
            if action == LocalAction.START:
                local = _Local()
                self._local[eid] = local
                local.task = asyncio.create_task(self._supervise(eid, local))
            elif action == LocalAction.KILL:
                elog.info(
                    "stopping engine process (record %s)",
                    f"{record.state.value} on {record.node or '-'}" if record else "deleted",
                )
                await self._release(eid)
            elif action == LocalAction.STOP:
                await self._release(eid)
                await self._update(
                    eid,
                    lambda e: (
                        e.transition(S.STOPPED, f"stopped by node {self.node_id}")
                        if e.state == S.STOPPING and e.node == self.node_id
                        else None
                    ),
                )
                elog.info("engine stopped")
            elif action == LocalAction.MARK_GONE:
                await self._fail(
                    eid,
                    pid=None,
                    cause="engine process is gone (its worker restarted and found no live process)",
                )

    def _lock(self, eid: str) -> asyncio.Lock:
        return self._locks.setdefault(eid, asyncio.Lock())

    async def _release(self, eid: str) -> None:
        """Cancel the supervisor and stop the process (caller holds the engine's lock)."""
        local = self._local.get(eid)
        if local is None:
            return
        if local.task is not None and local.task is not asyncio.current_task():
            local.task.cancel()
            await asyncio.gather(local.task, return_exceptions=True)
        if local.proc is not None:
            await self.launcher.stop(local.proc, token=local.token, grace_s=self.agent.stop_grace_s)
        # Forgotten only once stopped: a drain interrupting this stop still finds the process.
        self._local.pop(eid, None)

    async def _drain(self, eid: str) -> None:
        async with self._lock(eid):
            await self._release(eid)
            # A deletion in progress still completes: Stopping -> Stopped.
            try:
                await self._update(
                    eid,
                    lambda e: (
                        e.transition(S.STOPPED, "worker drained")
                        if e.state == S.STOPPING and e.node == self.node_id
                        else None
                    ),
                )
            except StoreError as exc:
                # the process is stopped; the node lease, expiring, tells the controller
                self.log.warning(
                    "engine %s stopped; could not record it: %s", eid, exc, extra={"engine": eid}
                )

    # ---- one engine ---------------------------------------------------------------------------

    async def _supervise(self, eid: str, local: _Local) -> None:
        """Claim, download, launch, wait ready, then watch until the process fails."""
        elog = bind(self.log, engine=eid)
        try:
            if local.proc is None and not await self._launch(eid, local, elog):
                return
            proc = local.proc
            assert proc is not None
            was_running = local.running
            async with EngineClient(proc.endpoint, token=local.token) as client:
                cause = await self._wait_ready(proc, client)
                if cause is None:
                    if not local.running:
                        if not await self._mark_running(eid, proc, elog):
                            return  # the record moved on; the reconciler decides
                        self.counters.launches["ready"] += 1
                    was_running = local.running = True
                    cause = await self._monitor(proc, client)
            if not was_running:
                self.counters.launches["failed"] += 1
            # Only a start-up failure can be permanent: a crash after Running may not recur.
            failure = from_engine_exit(cause, exit_code=None if was_running else proc.exit_code())
            async with self._lock(eid):
                if self._local.get(eid) is local:
                    await self.launcher.terminate(proc)
                    self._local.pop(eid)
                    cause = policy.redact_text(cause, local.secrets)
                    permanent = failure.permanent and not was_running
                    await self._fail(eid, pid=proc.pid, cause=cause, permanent=permanent)
        except asyncio.CancelledError:
            raise
        except Exception:
            elog.exception("engine supervisor failed")
            raise

    async def _launch(self, eid: str, local: _Local, elog: ContextAdapter) -> bool:
        """Claim the engine (refused for good if the launch policy says no), fetch its model if
        it is a hub id not yet cached, start the shim."""
        claim = await self._claim(eid, local)
        if claim is None:
            return False
        claimed, spec, model_path, secrets = claim
        if model_path is None:  # Downloading: outside the lock, so a stop can cancel the wait
            model_path = await self._download(eid, claimed, spec, secrets, elog)
            if model_path is None:
                return False
        async with self._lock(eid):
            if self._local.get(eid) is not local:
                return False
            proc, token = self.launcher.launch(
                claimed,
                spec,
                advertise_host=self.advertise_host,
                grace_s=self.agent.stop_grace_s,
                model_path=model_path,
                secret_env=secrets,
                pool=self.pool,
            )
            self.counters.launches["spawned"] += 1
            local.secrets = tuple(secrets.values())
            local.proc, local.token = proc, token
            elog.info(
                "launched pid %d on %s (%s%s%s)",
                proc.pid,
                proc.endpoint,
                claimed.device,
                f" GPUs {claimed.gpus}" if claimed.gpus else "",
                ", a warm process" if proc.pooled else "",
            )
            recorded = await self._update(
                eid,
                lambda e: (
                    e.model_copy(
                        update={
                            "pid": proc.pid,
                            "pid_start_time": proc.start_time,
                            "endpoint": proc.endpoint,
                            "auth_token": token,
                            "spec_hash": specs.spec_hash(spec),  # what it really runs
                            "updated_at": time.time(),
                        }
                    )
                    if e.state == S.STARTING and e.node == self.node_id
                    else None
                ),
            )
            # If the record moved on (e.g. Stopping), the reconciler stops the process.
            return recorded is not None

    async def _claim(
        self, eid: str, local: _Local
    ) -> tuple[Engine, DeploymentSpec, str | None, dict[str, str]] | None:
        """CAS Scheduled -> Starting (model at hand: its path, "" for the shim to resolve) or ->
        Downloading (path None), with the spec's resolved secrets; None if the record moved on,
        the deployment is gone or the launch policy refused it (checked before any download)."""
        async with self._lock(eid):
            record = self._records.get(eid)
            if self._local.get(eid) is not local or record is None:
                self._local.pop(eid, None)
                return None
            spec = await self._deployment(record.deployment)
            refused: policy.PolicyError | None = None
            secrets: dict[str, str] = {}
            if spec is not None:
                try:
                    secrets = self._admit(spec)
                except policy.PolicyError as exc:
                    refused = exc
            path: str | None = ""
            if spec is not None and refused is None and is_hub_id(spec.model):
                cached = await asyncio.to_thread(self.downloads.cached, spec.model, spec.revision)
                path = str(cached) if cached is not None else None
            state = S.STARTING if path is not None else S.DOWNLOADING
            settings = None
            if spec is not None:
                settings = effective(
                    spec,
                    "cuda" if record.device == "cuda" else "cpu",
                    cpu_dtype=best_cpu_dtype(),
                )
            claimed = await self._update(
                eid,
                lambda e: (
                    e.transition(state, f"claimed by node {self.node_id}").model_copy(
                        update={"download": None, "settings": settings}
                    )
                    if e.state == S.SCHEDULED and e.node == self.node_id
                    else None
                ),
            )
            if claimed is None:
                self._local.pop(eid, None)  # lost the race or the record moved on
                return None
            if spec is None:
                self._local.pop(eid, None)
                await self._fail(eid, pid=0, cause=f"deployment {claimed.deployment} not found")
                return None
            if refused is not None:
                self._local.pop(eid, None)
                await self._refuse(eid, refused)
                return None
            return claimed, spec, path, secrets

    async def _download(
        self,
        eid: str,
        claimed: Engine,
        spec: DeploymentSpec,
        secrets: dict[str, str],
        elog: ContextAdapter,
    ) -> str | None:
        """Fetch the model while writing progress (with the spec's HF_TOKEN secret, if it names
        one, else the worker's own); Downloading -> Starting with its path, or Failed (None)."""
        progress = Progress()
        started = time.monotonic()
        elog.info("downloading %s@%s", spec.model, spec.revision)
        reporter = asyncio.create_task(self._report_progress(eid, spec, progress))
        try:
            path = await asyncio.to_thread(
                self.downloads.fetch,
                spec.model,
                spec.revision,
                progress,
                token=secrets.get("HF_TOKEN"),
            )
        except asyncio.CancelledError:
            progress.cancel()  # the thread stops at its next chunk and frees the repo's lock
            raise
        except Cancelled:
            return None
        except DownloadFailed as exc:
            async with self._lock(eid):
                self._local.pop(eid, None)
                cause = policy.redact_text(str(exc), secrets.values())
                await self._fail(eid, pid=0, cause=cause, permanent=exc.failure.permanent)
            return None
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        elapsed = time.monotonic() - started
        fetched = progress.done()
        why = (
            f"downloaded {fetched / 1e6:.1f} MB in {elapsed:.1f}s"
            if fetched
            else "found in the node's cache"
        )
        started_rec = await self._update(
            eid,
            lambda e: (
                e.transition(S.STARTING, why).model_copy(update={"download": None})
                if e.state == S.DOWNLOADING and e.node == self.node_id
                else None
            ),
        )
        elog.info("%s %s", spec.model, why)
        return str(path) if started_rec is not None else None

    def _with_progress(self, e: Engine, *, status: DownloadProgress) -> Engine | None:
        if e.state != S.DOWNLOADING or e.node != self.node_id:
            return None
        return e.model_copy(update={"download": status, "updated_at": time.time()})

    async def _report_progress(self, eid: str, spec: DeploymentSpec, progress: Progress) -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            done, rate = progress.sample()
            status = DownloadProgress(
                repo=spec.model,
                revision=spec.revision,
                done=done,
                total=progress.total,
                rate=rate,
                files=progress.files,
                waiting=progress.waiting,
            )
            try:
                await self._update(eid, functools.partial(self._with_progress, status=status))
            except StoreError as exc:  # progress is best effort; the download goes on
                self.log.warning("engine %s: progress not recorded: %s", eid, exc)

    def _admit(self, spec: DeploymentSpec) -> dict[str, str]:
        """Check `spec` against this worker's launch policy (whoever wrote it) and resolve its
        secrets; a `PolicyError` means it must not run here."""
        policy.check(spec, self.policy)
        if not spec.secrets:
            return {}
        path = self.agent.secrets_file
        text = None
        if path:
            try:
                text = Path(path).expanduser().read_text()
            except OSError as exc:
                raise policy.PolicyError(
                    "secrets.missing",
                    "secrets",
                    f"cannot read [agent] secrets_file {path}: {exc.strerror}",
                ) from None
        return policy.resolve_secrets(spec.secrets, env=os.environ, file_text=text, file_name=path)

    async def _refuse(self, eid: str, exc: policy.PolicyError) -> None:
        """Starting -> Failed for good (no process was started): the spec needs changing, a
        restart would be refused again."""
        cause = str(exc)[:MAX_REASON]
        refused = await self._update(
            eid,
            lambda e: (
                e.transition(S.FAILED, cause).model_copy(
                    update={"error": cause, "permanent": True, "next_restart_at": 0.0}
                )
                if e.state == S.STARTING and e.node == self.node_id
                else None
            ),
        )
        if refused is not None:
            bind(self.log, engine=eid).warning("engine refused: %s", cause)

    async def _deployment(self, name: str) -> DeploymentSpec | None:
        kv = await self.store.get(keys.deployment(name))
        return None if kv is None else decode_record(DeploymentSpec, kv.key, kv.value)

    async def _wait_ready(self, proc: EngineProcess, client: EngineClient) -> str | None:
        """None once HealthCheck says READY; else why it never will."""
        timeout = self.agent.start_timeout_s
        # A temporary error means "not listening yet": the exit and the timeout say the rest. A
        # permanent one (our token refused: another process answers on that port) never heals.
        try:
            outcome = await poll_ready(
                client, alive=proc.alive, timeout=timeout, interval=READY_POLL_S
            )
        except EngineError as exc:
            return f"health check refused: {exc}"
        if outcome == "exited":
            return self._exit_cause(proc)
        if outcome == "timeout":
            return f"not ready after {timeout:g}s (start timeout); last output: {proc.tail.cause()}"
        return None

    async def _mark_running(self, eid: str, proc: EngineProcess, elog: ContextAdapter) -> bool:
        async with self._lock(eid):
            running = await self._update(
                eid,
                lambda e: (
                    e.transition(S.RUNNING, f"ready on {proc.endpoint}").model_copy(
                        update={"started_at": time.time()}
                    )
                    if e.state == S.STARTING and e.node == self.node_id and e.pid == proc.pid
                    else None
                ),
            )
        if running is not None:
            elog.info(
                "engine running on %s (%.1fs after launch)",
                proc.endpoint,
                time.time() - proc.launched_at,
            )
        return running is not None

    async def _monitor(self, proc: EngineProcess, client: EngineClient) -> str:
        """Return the cause once the process exits or fails its health checks in a row."""
        failures, last_check, last_error = 0, time.monotonic(), ""
        while True:
            await asyncio.sleep(EXIT_POLL_S)
            if not proc.alive():
                return self._exit_cause(proc)
            if time.monotonic() - last_check < self.agent.health_check_interval_s:
                continue
            last_check = time.monotonic()
            try:
                reply = await client.health(timeout=5.0)
                ok = reply.status == pb.SERVING_STATUS_READY
                last_error = "" if ok else f"status {pb.ServingStatus.Name(reply.status)}"
            except EngineError as exc:
                ok, last_error = False, str(exc)
            failures = 0 if ok else failures + 1
            if failures >= self.agent.health_check_failures:
                return f"health check failed {failures} times in a row: {last_error}"

    @staticmethod
    def _exit_cause(proc: EngineProcess) -> str:
        last = proc.tail.cause()
        return (
            f"{proc.exit_description()}; last output: {last}" if last else proc.exit_description()
        )

    async def _fail(
        self, eid: str, *, pid: int | None, cause: str, permanent: bool = False
    ) -> None:
        """Downloading/Starting/Running here -> Failed with `cause` and the backoff's next restart
        time (`permanent`: never restarted). An engine that had been Running for
        `restart_reset_s` starts its restart count afresh."""
        cause = cause[:MAX_REASON]
        reset_after = self.settings.scheduler.restart_reset_s

        def change(e: Engine) -> Engine | None:
            if e.node != self.node_id or e.state not in (S.DOWNLOADING, S.STARTING, S.RUNNING):
                return None
            if pid is not None and e.pid not in (0, pid):
                return None  # a newer launch of the same engine: not this failure's record
            now = time.time()
            restarts = e.restarts
            if e.state == S.RUNNING and e.started_at and now - e.started_at >= reset_after:
                restarts = 0  # a failure after a long healthy run is not a crash loop
            return e.transition(S.FAILED, cause).model_copy(
                update={
                    "error": cause,
                    "permanent": permanent,
                    "download": None,
                    "restarts": restarts,
                    "next_restart_at": now + self.backoff.delay(restarts),
                }
            )

        if await self._update(eid, change) is not None:
            bind(self.log, engine=eid).warning(
                "engine failed%s: %s", " (permanent: no restart)" if permanent else "", cause
            )

    # ---- record writes ------------------------------------------------------------------------

    async def _update(self, eid: str, change: Callable[[Engine], Engine | None]) -> Engine | None:
        """Read-modify-CAS `engines/{eid}` until it sticks; None if `change` declines (or the
        record is gone). Retries while the store is briefly unreachable, except once stopping:
        then the store's own retry is all a write waits (a drain must not take minutes)."""
        key = keys.engine(eid)
        deadline = time.monotonic() + (0.0 if self._stopping else STORE_RETRY_S)
        while True:
            try:
                kv = await self.store.get(key)
                record = None if kv is None else decode_record(Engine, key, kv.value)
                if kv is None or record is None:
                    return None
                new = change(record)
                if new is None:
                    return None
                if (await self.store.compare_and_swap(kv, new.encode())).succeeded:
                    self._records[eid] = new
                    return new
            except StoreError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(1.0)

    # ---- adoption ------------------------------------------------------------------------------

    async def _adopt(self) -> None:
        """Take over engines a previous worker of this node launched, or clean up after them."""
        state = self.launcher.load_state()
        for eid, entry in state.items():
            record = self._records.get(eid)
            proc = self.launcher.adopt(eid, entry)
            if proc is None:
                self.log.info(
                    "engine %s from the state file is gone; cleaned up", eid, extra={"engine": eid}
                )
                continue
            if (
                record is None
                or record.node != self.node_id
                or record.pid != proc.pid
                or record.state not in (S.STARTING, S.RUNNING)
            ):
                self.log.info(
                    "engine %s (pid %d) is no longer wanted here; stopping it",
                    eid,
                    proc.pid,
                    extra={"engine": eid},
                )
                await self.launcher.stop(
                    proc, token=record.auth_token if record else "", grace_s=self.agent.stop_grace_s
                )
                continue
            local = _Local(proc=proc, token=record.auth_token, running=record.state == S.RUNNING)
            self._local[eid] = local
            local.task = asyncio.create_task(self._supervise(eid, local))
            self.log.info(
                "re-adopted engine %s (pid %d, %s)",
                eid,
                proc.pid,
                record.state.value,
                extra={"engine": eid},
            )
        self.launcher.save_state()
