"""Fault injection: malformed inputs, kills, signals, a full disk, races on OUT, hostile recipes.

Each test checks the same three things: no finished-looking OUT exists unless it is complete and
right, the inputs are byte-identical, and the next run succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import recipe_for, tree_hash
from safetensors.torch import load_file, save_file

import specmerge
from specmerge.errors import CheckpointError, OutputError, RecipeError, SpecmergeError
from specmerge.examples import llama_shape_for, write_example_models
from specmerge.io.checkpoint import INCOMPLETE_MARKER

CLI = [sys.executable, "-m", "specmerge.cli"]


def partials(root: Path) -> list[Path]:
    return sorted(root.glob(".*.partial-*"))


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Gap 1: malformed safetensors headers and shard indexes
# ---------------------------------------------------------------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


Q, K = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"


def _overlap(h):
    h[K]["data_offsets"] = list(h[Q]["data_offsets"])


def _shift(h):
    for name, e in h.items():
        if name != "__metadata__":
            e["data_offsets"] = [o + 16 for o in e["data_offsets"]]


def _negative(h):
    begin, end = h[Q]["data_offsets"]
    h[Q]["data_offsets"] = [-(end - begin), 0]


@pytest.mark.parametrize("edit", [_overlap, _shift, _negative], ids=["overlap", "shift16",
                                                                      "negative_begin"])
def test_malformed_header_is_refused(toy_models, tmp_path, edit) -> None:
    _rewrite_header(toy_models["experts"][1] / "model.safetensors", edit)
    recipe = _recipe_file(toy_models, tmp_path)
    before = tree_hash(toy_models["root"])
    out = tmp_path / "out"
    res = cli("merge", "--quiet", recipe, str(out))
    line = one_error_line(res)
    assert "e1/model.safetensors" in line and "not a valid safetensors file" in line
    assert not out.exists() and not partials(tmp_path)
    assert tree_hash(toy_models["root"]) == before


def _sharded(tmp_path: Path, weight_map) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


@pytest.mark.parametrize("weight_map, message", [
    ({"a": "../../elsewhere/x.safetensors"}, "refusing to read outside"),
    ({"a": "/etc/passwd"}, "refusing to read outside"),
    (["a"], "'weight_map' that is a JSON list"),
    ("model-00001-of-00001.safetensors", "'weight_map' that is a JSON str"),
    ({"a": 3}, "weight_map['a'] must be a shard file name"),
])
def test_bad_shard_index_is_refused(tmp_path, weight_map, message) -> None:
    from specmerge.io.checkpoint import Checkpoint

    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Checkpoint(_sharded(tmp_path, weight_map))


# ---------------------------------------------------------------------------------------------
# Gap 2: OUT is never replaced without --force, and only the OUT that was there with it
# ---------------------------------------------------------------------------------------------

def _interfere(monkeypatch, action, at: int = 3) -> None:
    import specmerge.engine.update as engine

    real, calls = engine.merged_update, {"n": 0}

    def hooked(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merged_update", hooked)


@pytest.mark.parametrize("workers", [1, 2])
def test_out_created_during_the_merge_is_kept(toy_models, tmp_path, monkeypatch, workers) -> None:
    out = tmp_path / "out"

    def user_creates_out():
        out.mkdir()
        (out / "mine.txt").write_text("the user's file")

    _interfere(monkeypatch, user_creates_out)
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        specmerge.merge(recipe_for(toy_models), out, workers=workers, progress=False)
    assert (out / "mine.txt").read_text() == "the user's file"
    assert not partials(tmp_path)


def test_force_replaces_only_the_out_that_was_there_at_the_start(toy_models, tmp_path,
                                                                 monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "specmerge_recipe.yaml").write_text("{}\n")  # a previous output: --force may replace

    def someone_swaps_out():
        os.rename(out, tmp_path / "moved")
        out.mkdir()
        (out / "new.txt").write_text("someone else's")

    _interfere(monkeypatch, someone_swaps_out)
    with pytest.raises(OutputError, match="appeared"):
        specmerge.merge(recipe_for(toy_models), out, force=True, progress=False)
    assert (out / "new.txt").read_text() == "someone else's"
    assert (tmp_path / "moved" / "old.txt").read_text() == "old"
    # and --force with nothing in the way replaces the old OUT (once it is a specmerge output)
    monkeypatch.undo()
    (out / "specmerge_recipe.yaml").write_text("{}\n")
    shutil_out = specmerge.merge(recipe_for(toy_models), out, force=True, progress=False)
    assert (shutil_out.out_dir / "model.safetensors").is_file()
    assert not (out / "new.txt").exists() and not partials(tmp_path)


def _synthetic(root: Path, params: int, k: int = 2) -> tuple[Path, str]:
    dirs = write_example_models(root / "models", llama_shape_for(params), k, dtype="bfloat16",
                                progress=False)
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({"base_model": str(dirs[0]),
                                  "models": [str(d) for d in dirs[1:]],
                                  "merge_method": "task_arithmetic"}))
    return root / "models", str(recipe)


def test_concurrent_merges_into_one_out_leave_one_winner(tmp_path) -> None:
    models, recipe = _synthetic(tmp_path, 5_000_000)
    before = tree_hash(models)
    out = tmp_path / "out"
    procs = [subprocess.Popen([*CLI, "merge", "--quiet", recipe, str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes[0] == 0 and all(c == 1 for c in codes[1:]), results
    for code, _, err in results:
        if code:
            assert ("appeared while this run was writing" in err
                    or "already exists" in err), err
    assert load_file(str(out / "model.safetensors"))  # the winner's model is complete
    assert not partials(tmp_path) and tree_hash(models) == before


# ---------------------------------------------------------------------------------------------
# Gap 3: kill -9, SIGTERM and SIGHUP; stale partials; a partial given as an input
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, str, dict[str, torch.Tensor], dict[int, float]]:
    """A ~50M-parameter bf16 base and 2 experts, the merged reference, and per worker count
    how long the partial directory lives (from its creation to the rename)."""
    root = tmp_path_factory.mktemp("big")
    models, recipe = _synthetic(root, 50_000_000)
    spans = {}
    for workers in (1, 2):
        ref = root / f"ref{workers}"
        proc, t0 = _start(recipe, ref, workers)
        while not ref.exists() and proc.poll() is None:
            time.sleep(0.005)
        spans[workers] = time.monotonic() - t0
        assert proc.wait() == 0
    return models, recipe, load_file(str(root / "ref1" / "model.safetensors")), spans


def _start(recipe: str, out: Path, workers: int) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen([*CLI, "merge", "--quiet", "--workers", str(workers), recipe,
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not partials(out.parent) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc, time.monotonic()


def _check_complete_or_absent(out: Path, ref: dict[str, torch.Tensor]) -> None:
    if out.exists():  # the kill came after the rename: then it must be the whole, right model
        got = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(got[n], ref[n]) for n in ref)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("at", [0.02, 0.5, 0.9])
def test_kill_9_leaves_no_finished_looking_output(big, tmp_path, workers, at) -> None:
    models, recipe, ref, spans = big
    before = tree_hash(models)
    out = tmp_path / "out"
    for attempt in range(4):  # early, halfway, late in the writing (of a run timed earlier)
        proc, t0 = _start(recipe, out, workers)
        time.sleep(at * spans[workers] / 2**attempt)
        proc.kill()
        proc.wait()
        _check_complete_or_absent(out, ref)
        if at > 0.5 or not out.exists():
            break
        # this run was faster than the timed one (the machine's load changed) and finished
        # before the kill: kill the next one earlier, so that the kill does come mid-write
        shutil.rmtree(out)
    left = partials(tmp_path)
    if at <= 0.5:  # early and halfway: the kill came before the rename
        assert left and not out.exists()
    for p in left:  # what a kill -9 leaves is marked as unfinished, with its owner
        owner = json.loads((p / INCOMPLETE_MARKER).read_text())
        assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
        with pytest.raises(CheckpointError, match="unfinished specmerge output"):
            specmerge.merge({"base_model": str(p), "models": [str(models / "expert_1")],
                             "merge_method": "task_arithmetic"}, tmp_path / "x", progress=False)
    # the next run removes the dead process's partial, says so, and succeeds
    res = cli("merge", "--quiet", "--force", recipe, str(out))
    assert res.returncode == 0, res.stderr
    if left:
        assert "removed" in res.stderr and "no longer running" in res.stderr
    assert not partials(tmp_path)
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert tree_hash(models) == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up(big, tmp_path, sig) -> None:
    models, recipe, ref, spans = big
    out = tmp_path / "out"
    proc, _ = _start(recipe, out, 1)
    time.sleep(0.3 * spans[1])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode in (0, -sig):  # finished before the signal arrived, or it arrived
        assert out.exists()  # after the output was complete and the handler put back (exit)
        _check_complete_or_absent(out, ref)
        return
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert not out.exists() and not partials(tmp_path)


def _partial_of(directory: Path, pid: int | None = None) -> Path:
    """``directory`` made to look like the partial output of process ``pid`` (default: one that
    has exited) on this host."""
    if pid is None:
        dead = subprocess.Popen(["true"])
        dead.wait()
        pid = dead.pid
    directory.mkdir()
    (directory / INCOMPLETE_MARKER).write_text(json.dumps({"pid": pid,
                                                           "host": socket.gethostname()}))
    return directory


def test_stale_partial_of_a_dead_process_is_removed(toy_models, tmp_path, caplog) -> None:
    stale = _partial_of(tmp_path / ".out.partial-stale")
    alive = _partial_of(tmp_path / ".out.partial-alive", os.getpid())
    with caplog.at_level("WARNING"):
        specmerge.merge(recipe_for(toy_models), tmp_path / "out", progress=False)
    assert not stale.exists() and alive.exists()  # a live process's partial is not touched
    assert "no longer running" in caplog.text


def test_a_stale_partial_that_is_a_symlink_is_left_and_not_logged_as_removed(
        toy_models, tmp_path, caplog) -> None:
    target = _partial_of(tmp_path / "elsewhere")
    (target / "data.txt").write_text("keep")
    link = tmp_path / ".out.partial-link"
    link.symlink_to(target)
    with caplog.at_level("WARNING"):
        specmerge.merge(recipe_for(toy_models), tmp_path / "out", progress=False)
    assert link.is_symlink() and (target / "data.txt").read_text() == "keep"
    assert "removed" not in caplog.text

# ---------------------------------------------------------------------------------------------
# A full disk (a real 1 MB tmpfs when root, else ENOSPC simulated in test_bad_input)
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting needs root")
def test_full_disk_on_a_real_tmpfs(tmp_path) -> None:
    models, recipe = _synthetic(tmp_path, 2_000_000)
    before = tree_hash(models)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        res = cli("merge", "--quiet", recipe, str(mnt / "out"))
        assert "disk full" in one_error_line(res)
        assert not (mnt / "out").exists() and not partials(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert tree_hash(models) == before
    res = cli("merge", "--quiet", recipe, str(tmp_path / "out"))  # room elsewhere: it succeeds
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# Gap 8: output directories follow the umask
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_output_follows_the_umask(toy_models, tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        out = specmerge.merge(recipe_for(toy_models), tmp_path / "out", progress=False).out_dir
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
    assert (out / "model.safetensors").stat().st_mode & 0o777 == mode & 0o666


# ---------------------------------------------------------------------------------------------
# Gaps 4 and 5: recipes are bounded and validated at load time
# ---------------------------------------------------------------------------------------------

def _recipe_file(models: dict, tmp_path: Path, **extra) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(json.dumps(recipe_for(models, **extra)))
    return str(p)


def test_yaml_alias_bomb_is_refused_fast_and_briefly(toy_models, tmp_path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    p = tmp_path / "bomb.yaml"
    p.write_text(f"base_model: {toy_models['base']}\nmodels: [{toy_models['experts'][0]}]\n"
                 f"merge_method: ties\nparameters:\n  density: 0.5\n  aggregate: *i\n"
                 + bomb.replace("\n", "\n  ").join(["junk:\n  ", ""]))
    t0 = time.monotonic()
    with pytest.raises(RecipeError, match="aliases") as info:
        specmerge.load_recipe(p)
    assert time.monotonic() - t0 < 2 and len(str(info.value)) < 1000


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nmerge_method: dare\n", "duplicate key 'merge_method'"),
    ("parameters: {scaling: .nan}\n", "scaling"),
    ("parameters: {scaling: .inf}\n", "scaling"),
    ("parameters: {scaling: 1.0e+300}\n", "scaling"),
    ("scope: {fallback_scaling: .nan}\n", "fallback_scaling"),
    ("scope: {exclude: ['re:(']}\n", r"scope.exclude: exclude\[0\] 're:\(' is not a valid regular"),
    ("calibrate: {method: svc, target: 3}\n", "calibrate.target 3 is not a task index"),
    ("parameters: {aggregate: " + "x" * 100_000 + "}\n", "aggregate"),
])
def test_recipe_values_are_checked_at_load_time(toy_models, tmp_path, text, message) -> None:
    base = recipe_for(toy_models, "ties")
    lines = [f"{k}: {json.dumps(v)}" for k, v in base.items() if f"{k}:" not in text]
    p = tmp_path / "r.yaml"
    p.write_text("\n".join(lines) + "\n" + text.replace("merge_method: ties\n", ""))
    if "duplicate" in message:
        p.write_text("\n".join(lines) + "\n" + text)
    with pytest.raises(RecipeError, match=message) as info:
        specmerge.load_recipe(p)
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 1e300])
def test_model_weights_are_finite_and_bounded(toy_models, weight) -> None:
    r = recipe_for(toy_models, "weight_average")
    r["models"] = [{"model": m, "weight": weight} for m in r["models"]]
    with pytest.raises(RecipeError, match="weight"):
        specmerge.load_recipe(r)


def test_weights_summing_to_zero_are_refused_at_load_time(toy_models) -> None:
    r = recipe_for(toy_models, "weight_average")
    r["models"] = [{"model": m, "weight": w} for m, w in zip(r["models"], [1, -1, 0],
                                                              strict=True)]
    with pytest.raises(RecipeError, match="sum to zero"):
        specmerge.load_recipe(r)


def test_binary_recipe_names_the_file(tmp_path) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x89\xff\x00binary")
    with pytest.raises(RecipeError, match=r"model.safetensors: not a text file"):
        specmerge.load_recipe(p)


@pytest.mark.parametrize("args, message", [
    (["--device", "bogus"], "invalid device 'bogus'"),
    (["--dtype", "float16"], "compute dtype"),
    (["--shard-size", "lots"], "invalid size 'lots'"),
    (["--seed", "-1"], None),
])
def test_cli_bad_options_print_one_error_line(toy_models, tmp_path, args, message) -> None:
    res = cli("merge", "--quiet", *args, _recipe_file(toy_models, tmp_path), str(tmp_path / "o"))
    if message is None:  # a negative seed is a seed like any other
        assert res.returncode == 0, res.stderr
        return
    assert message in one_error_line(res)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["merge", "nope.yaml", "o"], "nope.yaml: recipe file not found"),
    (["merge", "RECIPE", "BASE"], "lies inside the input"),
    (["merge", "RECIPE", "TAKEN"], "already exists"),
    (["analyze", "nope.yaml"], "nope.yaml: recipe file not found"),
    (["diagnose", "RECIPE", "nope"], "no parameter named 'nope'"),
    (["inspect", "nowhere"], "no such file or directory"),
])
def test_cli_failure_paths_print_one_error_line(toy_models, tmp_path, args, message) -> None:
    (tmp_path / "taken").mkdir()
    subst = {"RECIPE": _recipe_file(toy_models, tmp_path), "BASE": str(toy_models["base"] / "o"),
             "TAKEN": str(tmp_path / "taken")}
    res = cli(*[subst.get(a, a) for a in args], cwd=tmp_path)
    assert message in one_error_line(res)


# ---------------------------------------------------------------------------------------------
# Gap 6: NaN/Inf is found when its tensor is read; the merge stops cleanly
# ---------------------------------------------------------------------------------------------

def test_nan_in_the_last_tensor_stops_cleanly_and_the_readme_says_when(toy_models,
                                                                      tmp_path) -> None:
    sd = dict(toy_models["expert_sds"][2])
    last = sorted(sd)[-1]
    sd[last] = sd[last].clone()
    sd[last].view(-1)[0] = float("nan")
    save_file(sd, str(toy_models["experts"][2] / "model.safetensors"))
    with pytest.raises(SpecmergeError, match=f"e2/model.safetensors: tensor '{last}' holds 1"):
        specmerge.merge(recipe_for(toy_models), tmp_path / "out", workers=2, progress=False)
    assert not (tmp_path / "out").exists() and not partials(tmp_path)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "NaN/Inf in any input is an error" in readme
    assert "found when its tensor is read" in readme


def test_force_keeps_the_old_out_when_the_final_rename_fails(toy_models, tmp_path,
                                                             monkeypatch) -> None:
    import specmerge.io.writer as writer

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "specmerge_recipe.yaml").write_text("{}\n")  # a previous output: --force may replace
    real = writer.rename_noreplace

    def failing(src, dst):
        if ".partial-" in str(src):
            raise KeyboardInterrupt  # a signal between moving OUT aside and claiming it
        return real(src, dst)

    monkeypatch.setattr(writer, "rename_noreplace", failing)
    with pytest.raises(KeyboardInterrupt):
        specmerge.merge(recipe_for(toy_models), out, force=True, progress=False)
    assert (out / "old.txt").read_text() == "old"
    assert not partials(tmp_path) and not list(tmp_path.glob(".out.old-*"))


def test_in_memory_merges_leave_the_callers_signal_handlers_alone(toy_models,
                                                                   monkeypatch) -> None:
    import specmerge.engine.update as engine

    def mine(signum, frame):  # pragma: no cover - never called
        pass

    old = signal.signal(signal.SIGTERM, mine)
    seen = []
    real = engine.merged_update

    def spy(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merged_update", spy)
    try:
        specmerge.merge_state_dicts(recipe_for(toy_models), toy_models["base_sd"],
                                    toy_models["expert_sds"])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen and all(h is mine for h in seen)


def test_plan_of_a_checkpoint_without_tensors_prints_no_traceback(tmp_path) -> None:
    for d in ("b", "e"):
        (tmp_path / d).mkdir()
        save_file({}, str(tmp_path / d / "model.safetensors"))
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps({"base_model": str(tmp_path / "b"), "models": [str(tmp_path / "e")],
                             "merge_method": "task_arithmetic"}))
    res = cli("plan", str(p))
    assert res.returncode == 0 and "Traceback" not in res.stderr and "0 tensors" in res.stdout
