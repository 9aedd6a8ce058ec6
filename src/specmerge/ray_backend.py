"""The Ray backend: the plan's entries run as Ray tasks across a cluster, with the same bytes as
the local backend.

Unit of work: a group of consecutive plan entries of about ``task_bytes`` (in the float32
compute dtype), fewer when that would leave cluster slots idle. A task runs the engine's step on
each entry of its group; a merge step writes each tensor at its offset in the output's
pre-allocated shards itself (``MergeStep.write_whole``) and returns only ``Written``, so memory
per task stays at the tensors in flight and no tensor crosses the network. Whole-model
statistics (TIES's global threshold) run as tasks too; their partials return to the driver,
which reduces them exactly, in any order.

Inputs and output live on a file system that every node sees at the same paths (NFS, Lustre, a
cloud file store). Before any work the driver runs a probe on every alive node: it checks that
the node sees every input file with the same size and the same first and last 64 KiB, and the
same specmerge and torch versions; after the output's partial directory is made, that the node
sees its shard files. Only the driver renames the partial directory into place.

Determinism. Every task computes with the driver's torch thread count (LAPACK's SVD and eigh
round differently with another count), so a merge gives the bytes of a local run by the driver,
however entries are grouped, whichever node runs them and in whatever order they finish.

Faults. A worker process that dies mid-task is retried by Ray (``max_retries``); the retried
task rewrites the same bytes at the same offsets. A task that fails with an error (bad input,
NaN) is not retried: its error reaches the user, naming the node.

GPUs. A task that asks for a GPU runs in a fresh worker process (``max_calls=1``): Ray gives each
task its GPU through ``CUDA_VISIBLE_DEVICES``, and torch keeps the device it first saw, so a
reused worker could compute on the GPU of an earlier task while Ray counts another one as busy.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specmerge._version import __version__
from specmerge.backends import Step
from specmerge.errors import Interrupted, MergeError, SpecmergeError
from specmerge.plan import PlanEntry

log = logging.getLogger(__name__)

PROBE_BYTES = 64 * 1024  # the head and the tail of each input file compared between nodes
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class NodeInfo:
    """Where a task ran."""

    node_id: str
    host: str
    ip: str
    pid: int

    def describe(self) -> str:
        return f"node {self.ip} ({self.host}, Ray node {self.node_id[:8]})"


def node_info() -> NodeInfo:
    import ray

    ctx = ray.get_runtime_context()
    return NodeInfo(ctx.get_node_id(), socket.gethostname(), ray.util.get_node_ip_address(),
                    os.getpid())


def file_view(path: str) -> tuple[int, str] | str:
    """(size, digest of the first and last ``PROBE_BYTES``) of ``path``, or the OS's error."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = hashlib.sha256(f.read(PROBE_BYTES))
            if size > PROBE_BYTES:
                f.seek(max(PROBE_BYTES, size - PROBE_BYTES))
                digest.update(f.read(PROBE_BYTES))
    except OSError as err:
        return err.strerror or str(err)
    return size, digest.hexdigest()


def versions() -> dict[str, str]:
    return {"specmerge": __version__, "torch": torch.__version__}


def probe(paths: Sequence[str]) -> tuple[NodeInfo | None, dict[str, str], dict[str, Any]]:
    """What this process sees: node, versions, and ``file_view`` of every path."""
    try:
        node = node_info()
    except Exception:  # the driver, outside a Ray worker
        node = None
    return node, versions(), {p: file_view(p) for p in paths}


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Around Ray's blocking calls: a SIGTERM or SIGHUP that lands while Ray's C code waits
    raises ``Interrupted`` in the handler, which Cython reports as a SystemError with it
    attached. Re-raise the Interrupted, so that the run cleans up and exits with 128 + the
    signal like a local one."""
    try:
        yield
    except SystemError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, Interrupted):
            raise cause from None
        raise


def run_group(step: Step[Any], entries: Sequence[PlanEntry], source: Any, threads: int
              ) -> tuple[NodeInfo, list[Any]]:
    """A Ray task: ``step`` on each entry, with the driver's torch thread count. A
    SpecmergeError (bad input, NaN) keeps its type and gains the node that raised it."""
    torch.set_num_threads(threads)
    node = node_info()
    try:
        return node, [step(entry, source) for entry in entries]
    except SpecmergeError as err:
        err.args = (f"{err} (on {node.describe()})", *err.args[1:])
        raise


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Fail fast, naming ``address``, when a cluster's ``host:port`` takes no connection (Ray
    itself retries for minutes). ``auto``, ``local``, ``ray://`` and None are left to Ray."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SpecmergeError(f"ray: invalid address {address!r}; use HOST:PORT (the address "
                             f"'ray start --head' printed), auto, or leave it out")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise SpecmergeError(f"ray: cannot reach the Ray cluster at {address}: "
                             f"{err.strerror or err}; is 'ray start --head' running there?"
                             ) from None


def import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise SpecmergeError("the ray backend needs Ray: pip install 'specmerge[ray]'") from err
    return ray


@dataclass
class RayBackend:
    """Runs steps as Ray tasks. ``address``: the cluster's (``ray start --head`` prints it;
    None: ``RAY_ADDRESS``, else the cluster that ``ray start`` last started on this machine,
    else a new local instance: Ray's own order). ``threads``: torch threads per task (default
    the driver's, for the driver's bytes). ``num_cpus``/``num_gpus``: what each task asks Ray
    for (default: ``threads`` CPUs, at most the largest node's, so that tasks do not
    oversubscribe a node; ``num_gpus`` only with a CUDA device, fractions share a GPU).
    ``task_bytes``: the largest group of parameters per task, in the float32 compute dtype;
    ``groups_per_slot``: the fewest groups per task slot, for balance on a small plan."""

    address: str | None = None
    num_cpus: float | None = None
    num_gpus: float = 1.0
    use_gpus: bool = False
    task_bytes: int = 2 * 10**9
    groups_per_slot: int = 4
    max_retries: int = 3
    threads: int = field(default_factory=torch.get_num_threads)
    remote = True
    _nodes: Counter[NodeInfo] = field(default_factory=Counter, init=False, repr=False)

    def __post_init__(self) -> None:
        if ((self.num_cpus is not None and self.num_cpus < 0) or self.num_gpus < 0
                or (self.use_gpus and self.num_gpus == 0)):
            raise SpecmergeError(f"ray: num_cpus ({self.num_cpus}) must be >= 0 and num_gpus "
                                 f"({self.num_gpus}) > 0 with a CUDA device")
        if self.task_bytes < 1 or self.max_retries < 0:
            raise SpecmergeError("ray: task_bytes must be >= 1 and max_retries >= 0")

    def connect(self) -> Any:
        """Ray, initialised on this cluster (once per process)."""
        ray = import_ray()
        if not ray.is_initialized():
            # keep Ray's current behaviour for CPU tasks (and its FutureWarning out of the way)
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            check_reachable(self.address or os.environ.get("RAY_ADDRESS"))
            try:
                ray.init(address=self.address, logging_level=logging.WARNING,
                         include_dashboard=False)  # workers' warnings reach the user
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = (self.address or os.environ.get("RAY_ADDRESS")
                         or "this machine's Ray ('ray start''s last cluster, or a new one)")
                raise SpecmergeError(f"ray: cannot connect to {where}: {err}") from err
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            log.info("ray: connected to %s (%d node(s), %g CPU(s), %g GPU(s))%s",
                     ray.get_runtime_context().gcs_address, len(nodes),
                     ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0),
                     "" if self.address or "RAY_ADDRESS" in os.environ else
                     ": no address was given, so Ray joined the cluster 'ray start' last started "
                     "on this machine or started a new local one")
        return ray

    def options(self) -> dict[str, Any]:
        return {"num_cpus": self.cpus_per_task(),
                "num_gpus": self.num_gpus if self.use_gpus else 0,
                "max_retries": self.max_retries, "retry_exceptions": False}

    def cpus_per_task(self) -> float:
        if self.num_cpus is not None:
            return self.num_cpus
        largest = max((n.get("Resources", {}).get("CPU", 0) for n in self.connect().nodes()
                       if n.get("Alive")), default=1)
        return float(max(1, min(self.threads, int(largest))))

    def slots(self) -> int:
        """How many tasks the cluster runs at once (at least 1)."""
        res = self.connect().cluster_resources()
        cpus = self.cpus_per_task()
        per = [res.get("CPU", 0) / cpus if cpus else math.inf]
        if self.use_gpus:
            per.append(res.get("GPU", 0) / self.num_gpus)
        n = min(per)
        return max(1, int(n) if math.isfinite(n) else 1)

    def groups(self, entries: Sequence[PlanEntry]) -> list[list[PlanEntry]]:
        """Consecutive entries, about ``task_bytes`` each, and at least ``groups_per_slot``
        groups per slot when the plan is big enough: grouping never changes the output."""
        sizes = [max(1, e.numel) * 4 for e in entries]
        target = max(1, min(self.task_bytes,
                            sum(sizes) // (max(1, self.groups_per_slot) * self.slots())))
        groups: list[list[PlanEntry]] = []
        size = 0
        for entry, n in zip(entries, sizes, strict=True):
            if not groups or (size + n > target and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += n
        return groups

    def check_files(self, paths: Sequence[Path], what: str) -> None:
        """Every alive node sees each of ``paths`` as the driver does (size, head and tail),
        and runs the driver's specmerge and torch; else a SpecmergeError naming node and path."""
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        names = [str(p) for p in paths]
        _, mine, expected = probe(names)
        task = ray.remote(probe)
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(
            "GPU" if self.use_gpus else "CPU", 0) > 0]
        if not nodes:
            raise SpecmergeError("ray: the cluster has no alive node with "
                                 f"{'a GPU' if self.use_gpus else 'a CPU'}")
        refs = {task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(names): n for n in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        if late:
            n = refs[late[0]]
            raise SpecmergeError(f"ray: node {n.get('NodeManagerAddress')} did not answer the "
                                 f"input check within {PROBE_TIMEOUT_S:.0f} s")
        for ref in ready:
            node, theirs, seen = self.get(ref, f"the {what} check")
            where = node.describe() if node else "a node"
            if theirs != mine:
                raise SpecmergeError(f"ray: {where} runs {theirs}, the driver {mine}; install the "
                                     f"same specmerge and torch on every node")
            for path in names:
                got, want = seen[path], expected[path]
                if got == want:
                    continue
                if isinstance(got, str):
                    raise SpecmergeError(f"ray: {where} cannot read the {what} {path}: {got}. "
                                         f"Every node must see the {what}s at the same path on a "
                                         f"shared file system (see docs/cluster.md)")
                if isinstance(want, str):
                    raise SpecmergeError(f"ray: the driver cannot read the {what} {path}: {want}")
                detail = (f"{got[0]} bytes where the driver sees {want[0]}" if got[0] != want[0]
                          else "different bytes from the driver's (same size)")
                raise SpecmergeError(f"ray: {where} sees the {what} {path} with {detail}; every "
                                     f"node must see the same files on a shared file system")
        log.info("ray: %d node(s) see the %d %s file(s)", len(ready), len(names), what)

    def get(self, ref: Any, what: str) -> Any:
        """``ray.get`` with a task's error re-raised as the user's error, naming the node."""
        ray = self.connect()
        try:
            with interruptible():
                return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, SpecmergeError):
                raise cause from None
            raise MergeError(f"ray: {what} failed on node {getattr(err, 'ip', '?')}: "
                             f"{cause if cause is not None else err}") from None
        except ray.exceptions.RayError as err:  # a worker or node died after every retry
            raise MergeError(f"ray: {what} failed after {self.max_retries} retries: "
                             f"{type(err).__name__}: {str(err).splitlines()[0]}") from None

    def map(self, step: Step[Any], entries: Sequence[PlanEntry], source: Any
            ) -> Iterator[tuple[PlanEntry, Any]]:
        ray = self.connect()
        groups = self.groups(entries)
        # a GPU task in a fresh worker: torch keeps the first CUDA_VISIBLE_DEVICES it saw
        task = (ray.remote(max_calls=1)(run_group) if self.use_gpus
                else ray.remote(run_group)).options(**self.options())
        step_ref, source_ref = ray.put(step), ray.put(source)
        pending = {task.remote(step_ref, group, source_ref, self.threads): group
                   for group in groups}
        ran: Counter[str] = Counter()
        try:
            while pending:
                with interruptible():
                    done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    group = pending.pop(ref)
                    node, results = self.get(ref, f"tensors {group[0].name!r}..{group[-1].name!r}")
                    if node not in self._nodes:
                        log.info("ray: worker on %s (pid %d)", node.describe(), node.pid)
                    self._nodes[node] += len(group)
                    ran[node.describe()] += len(group)
                    yield from zip(group, results, strict=True)
            log.info("ray: %d tasks of %s ran on %s", len(groups), type(step).__name__,
                     ", ".join(f"{where} ({n} tensors)" for where, n in sorted(ran.items())))
        finally:
            for ref in pending:
                ray.cancel(ref, force=False)
            del step_ref, source_ref

