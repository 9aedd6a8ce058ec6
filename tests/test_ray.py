"""The Ray backend on a local multi-node cluster that the tests start themselves (3 nodes of 1
CPU each): the same bytes as the local backend for every method ± SVC, a worker killed
mid-merge, a driver killed mid-merge, and a node whose view of an input is wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

import specmerge  # noqa: E402
from specmerge.errors import SpecmergeError  # noqa: E402
from specmerge.examples import llama_shape_for, write_example_models  # noqa: E402
from specmerge.io.checkpoint import INCOMPLETE_MARKER  # noqa: E402
from specmerge.ray_backend import RayBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_golden as golden  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A head and two worker nodes, 1 CPU each; this process is the driver."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    c = Cluster()
    for _ in range(3):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING", include_dashboard=False,
             log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-golden")
    golden.make_models(root)
    return root


def run_on_ray(root: Path, model: str, case: tuple[str, str, dict[str, Any], dict[str, Any]],
               svc: bool, tag: str = "", **kw: Any) -> dict[str, str]:
    name = case[0]
    recipe = golden.recipe_of(root, model, case, svc)
    out = root / "out" / f"ray-{model}-{name}-{svc}{tag}"
    specmerge.merge(recipe, out, shard_size="300KB", progress=False, **{"backend": "ray", **kw})
    return golden.hash_dir(out, root)


def run_locally(root: Path, model: str, case: tuple[str, str, dict[str, Any], dict[str, Any]],
                svc: bool) -> dict[str, str]:
    """The same case on the local backend, in this session: the bytes Ray must reproduce
    (merged once, by whichever test asks first)."""
    out = root / "out" / f"{model}-{case[0]}-{svc}-1-local"
    if not out.exists():
        golden.run_case(root, model, case, svc, 1, "-local")
    return golden.hash_dir(out, root)


@pytest.mark.parametrize("case_id", [c for c in golden._case_ids() if c.endswith("-w1")])
def test_same_bytes_as_the_local_backend(cluster: Any, models: Path, case_id: str) -> None:
    """Every method ± SVC (TIES with trim_scope global included), on both golden models: the
    Ray backend writes the same bytes as the local backend on this machine, in this session."""
    model, case, svc, _ = golden.parse_case_id(case_id)
    assert run_on_ray(models, model, case, svc) == run_locally(models, model, case, svc)


def test_grouping_and_thread_count_do_not_change_bytes(cluster: Any, models: Path) -> None:
    """With the driver's own thread count, one tensor per task or all in one: the local bytes."""
    recipe = {"base_model": str(models / "synthetic" / "base"),
              "models": [str(models / "synthetic" / f"expert_{i}") for i in (1, 2, 3, 4)],
              "merge_method": "swudi", "calibrate": {"method": "svc"}}
    specmerge.merge(recipe, models / "out" / "local-2t", progress=False)
    want = golden.hash_dir(models / "out" / "local-2t", models)
    for task_bytes in (1, 10**12):
        out = models / "out" / f"ray-2t-{task_bytes}"
        specmerge.merge(recipe, out, progress=False,
                        backend=RayBackend(address=cluster.address, task_bytes=task_bytes))
        assert golden.hash_dir(out, models) == want


def test_backend_from_the_recipe_and_cli(cluster: Any, models: Path) -> None:
    from typer.testing import CliRunner

    from specmerge.cli import app

    recipe = models / "ray_recipe.yaml"
    recipe.write_text(
        f"base_model: {models / 'quickstart' / 'base'}\n"
        f"models: [{models / 'quickstart' / 'expert_1'}, {models / 'quickstart' / 'expert_2'}]\n"
        f"merge_method: ties\nbackend: {{name: ray, address: '{cluster.address}'}}\n")
    res = CliRunner().invoke(app, ["merge", str(recipe), str(models / "out" / "cli-ray"), "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["merge", str(recipe), str(models / "out" / "cli-local"), "-q",
                                   "--backend", "local"])
    assert res.exit_code == 0, res.output
    assert (golden.hash_dir(models / "out" / "cli-ray", models)
            == golden.hash_dir(models / "out" / "cli-local", models))
    # the resolved recipe records what was computed, not where
    assert "backend" not in (models / "out" / "cli-ray" / "specmerge_recipe.yaml").read_text()


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that each task of a spectral merge runs a good fraction of a second."""
    root = tmp_path_factory.mktemp("ray-slow")
    write_example_models(root, llama_shape_for(2_000_000), 3, dtype="float32", seed=3,
                         progress=False)
    return root


def slow_recipe(root: Path) -> dict[str, Any]:
    return {"base_model": str(root / "base"),
            "models": [str(root / f"expert_{i}") for i in (1, 2, 3)],
            "merge_method": "tsv_m", "calibrate": {"method": "svc"}}


def ray_tasks_running() -> list[psutil.Process]:
    """This test cluster's workers running a task (descendants of this process: other Ray
    clusters on the machine are left alone)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::run_group"):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_worker_killed_mid_merge_is_retried_to_the_same_bytes(cluster: Any,
                                                                  models: Path) -> None:
    """One group per node (3 tasks, each long enough to be caught running): the first task
    seen running is SIGKILLed; Ray retries it (without retries the test fails); the local
    backend's bytes result."""
    case = next(c for c in golden.CASES if c[0] == "tsv_m")
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            for p in ray_tasks_running():
                p.send_signal(signal.SIGKILL)
                killed.append(p.pid)
                break
            time.sleep(0.005)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        hashes = run_on_ray(models, "synthetic", case, svc=True, tag="-killed",
                            backend=RayBackend(task_bytes=10**12, groups_per_slot=1))
    finally:
        stop.set()
        thread.join()
    assert killed, "no Ray task was seen running, so none was killed"
    assert hashes == run_locally(models, "synthetic", case, svc=True)


DRIVER = """
import sys, specmerge
specmerge.merge(eval(sys.argv[1]), sys.argv[2], backend="ray", ray_address=sys.argv[3],
                progress=False)
"""


def test_a_killed_driver_leaves_no_finished_looking_output(cluster: Any,
                                                           slow_models: Path) -> None:
    out = slow_models / "killed"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, repr(slow_recipe(slow_models)),
                             str(out), cluster.address])
    try:
        partial = None
        deadline = time.monotonic() + 60
        while partial is None and time.monotonic() < deadline and proc.poll() is None:
            partial = next(slow_models.glob(".killed.partial-*"), None)
            time.sleep(0.01)
        assert partial is not None, "the driver never started writing"
        while not ray_tasks_running() and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not out.exists()
    assert (partial / INCOMPLETE_MARKER).exists()
    with pytest.raises(SpecmergeError, match="unfinished specmerge output"):
        specmerge.merge({**slow_recipe(slow_models), "models": [str(partial)]},
                        slow_models / "never", progress=False)
    specmerge.merge({**slow_recipe(slow_models), "merge_method": "task_arithmetic",
                     "calibrate": None}, out, progress=False, backend="ray")
    assert not partial.exists()  # the next run into the same OUT cleaned it up


def test_a_sigterm_to_the_cli_driver_exits_143_and_cleans_up(cluster: Any,
                                                              slow_models: Path) -> None:
    """SIGTERM while the driver waits in Ray's C code (Cython turned the handler's exception
    into a SystemError: exit 1 and a traceback-like line) is the same as a local run's."""
    recipe = slow_models / "sigterm.yaml"
    recipe.write_text(json.dumps(slow_recipe(slow_models)))
    out = slow_models / "sigterm-out"
    proc = subprocess.Popen([sys.executable, "-m", "specmerge.cli", "merge", str(recipe),
                             str(out), "-q", "--backend", "ray", "--ray-address",
                             cluster.address], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (not list(slow_models.glob(".sigterm-out.partial-*")) and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        while not ray_tasks_running() and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "SystemError" not in err
    assert not out.exists() and not list(slow_models.glob(".sigterm-out.partial-*"))


def test_a_worker_error_reaches_the_user_naming_the_tensor_and_node(cluster: Any, tmp_path: Path) -> None:
    from conftest import make_state_dicts, write_hf_dir

    base, experts = make_state_dicts()
    experts[1]["model.layers.0.mlp.up_proj.weight"][2, 3] = float("nan")
    recipe = {"base_model": str(write_hf_dir(tmp_path / "base", base)),
              "models": [str(write_hf_dir(tmp_path / f"e{i}", e)) for i, e in enumerate(experts)],
              "merge_method": "tsv_m"}
    with pytest.raises(SpecmergeError, match=r"up_proj.*NaN|NaN.*up_proj") as err:
        specmerge.merge(recipe, tmp_path / "out", progress=False, backend="ray")
    assert str(tmp_path / "e1") in str(err.value)
    assert re.search(r"\(on node [0-9.]+ \(.+, Ray node [0-9a-f]{8}\)\)", str(err.value)), err.value
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@dataclass(frozen=True)
class FakeEntry:
    name: str
    numel: int = 1


def where_am_i(entry: FakeEntry, source: Any) -> tuple[int, str]:
    """A step that reports its worker process and the GPU Ray gave it."""
    time.sleep(0.2)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_each_gpu_task_runs_in_a_fresh_worker(cluster: Any) -> None:
    """A node with 2 (fake) GPUs: Ray gives each GPU task its GPU by CUDA_VISIBLE_DEVICES, and
    torch keeps the first it saw, so a worker must never run a second GPU task."""
    from ray import cloudpickle

    node = cluster.add_node(num_cpus=1, num_gpus=2)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers can't import it
    try:
        backend = RayBackend(use_gpus=True, num_gpus=1, num_cpus=0.5, groups_per_slot=3)
        entries = [FakeEntry(f"t{i}") for i in range(6)]
        assert len(backend.groups(entries)) == 6
        seen = [result for _, result in backend.map(where_am_i, entries, None)]
        pids = [pid for pid, _ in seen]
        assert len(set(pids)) == len(pids), seen  # no worker ran two GPU tasks
        assert {gpu for _, gpu in seen} <= {"0", "1"}, seen
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        cluster.remove_node(node)


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs unshare -m (root) to give a node its own "
                                              "view of the file system")
def test_a_node_with_a_wrong_view_of_an_input_is_named(cluster: Any, models: Path,
                                                       tmp_path: Path) -> None:
    """A fourth node runs in its own mount namespace, where expert_1's weights are truncated
    and expert_2's directory is empty: the merge stops before any work, naming node and file."""
    qs = models / "quickstart"
    bad1, bad2 = tmp_path / "bad1", tmp_path / "bad2"
    shutil.copytree(qs / "expert_1", bad1)
    with open(bad1 / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 64)
    bad2.mkdir()
    ray_bin = Path(sys.executable).with_name("ray")
    script = (f"mount --bind {bad1} {qs / 'expert_1'} && mount --bind {bad2} {qs / 'expert_2'} "
              f"&& exec {ray_bin} start --address={cluster.address} --num-cpus=1 --block")
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before:
            assert time.monotonic() < deadline and node.poll() is None, "the node never joined"
            time.sleep(0.2)
        recipe = {"base_model": str(qs / "base"),
                  "models": [str(qs / f"expert_{i}") for i in (1, 2, 3)],
                  "merge_method": "task_arithmetic"}
        with pytest.raises(SpecmergeError) as err:
            specmerge.merge(recipe, tmp_path / "out", progress=False, backend="ray")
        msg = str(err.value)
        assert "expert_1/model.safetensors" in msg and "bytes where the driver sees" in msg
        assert "node " in msg and "Ray node" in msg
        recipe["models"] = [str(qs / "expert_2"), str(qs / "expert_3")]
        with pytest.raises(SpecmergeError, match=r"cannot read the input .*expert_2.*"
                                                 r"No such file"):
            specmerge.merge(recipe, tmp_path / "out", progress=False, backend="ray")
        assert not (tmp_path / "out").exists()
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
        deadline = time.monotonic() + 30
        while ({n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
               and time.monotonic() < deadline):
            time.sleep(0.2)


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_lora_experts_give_the_local_bytes(cluster: Any, tmp_path: Path, fmt: str) -> None:
    """Adapters as experts, written as a full model or as a PEFT adapter (whose factors the
    workers send back to the driver): the local backend's bytes."""
    pytest.importorskip("peft")
    from test_lora import adapter, llama

    base = llama(tmp_path)
    ads = [adapter(base, tmp_path / f"ad{i}", 20 + i, r=4, lora_alpha=8,
                   target_modules=["q_proj", "v_proj", "down_proj"]) for i in range(2)]
    recipe = {"base_model": str(base), "models": [str(a) for a in ads],
              "merge_method": "tsv_m", "calibrate": {"method": "svc"}, "output": {"format": fmt}}
    specmerge.merge(recipe, tmp_path / "local", progress=False)
    specmerge.merge(recipe, tmp_path / "ray", progress=False, backend="ray")
    assert golden.hash_dir(tmp_path / "ray", tmp_path) == golden.hash_dir(tmp_path / "local",
                                                                          tmp_path)


def test_backend_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    from specmerge.engine import make_backend
    from specmerge.ray_backend import check_reachable
    from specmerge.recipe import load_recipe

    base = {"base_model": "b", "models": ["e"], "merge_method": "task_arithmetic"}
    assert load_recipe({**base, "backend": "ray"}).backend.name == "ray"
    with pytest.raises(SpecmergeError, match="apply to name: ray only"):
        load_recipe({**base, "backend": {"address": "h:1"}})
    with pytest.raises(SpecmergeError, match="nodes"):
        load_recipe({**base, "backend": {"name": "ray", "nodes": 3}})
    with pytest.raises(SpecmergeError, match="workers applies to the local backend"):
        make_backend(2, "ray")
    with pytest.raises(SpecmergeError, match="unknown backend 'dask'"):
        make_backend(1, "dask")
    with pytest.raises(SpecmergeError, match="apply to backend 'ray' only"):
        make_backend(1, "local", ray_address="h:1")
    gpu = make_backend(1, "ray", device="cuda:1", ray_gpus=0.5, ray_cpus=2)
    assert isinstance(gpu, RayBackend) and gpu.use_gpus
    assert gpu.options() == {"num_cpus": 2, "num_gpus": 0.5, "max_retries": 3,
                             "retry_exceptions": False}
    assert make_backend(1, "ray", ray_cpus=1).options()["num_gpus"] == 0  # no CUDA device
    with pytest.raises(SpecmergeError, match="invalid address 'nonsense'"):
        check_reachable("nonsense")
    started = time.monotonic()
    with pytest.raises(SpecmergeError, match=r"cannot reach the Ray cluster at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    assert time.monotonic() - started < 10
