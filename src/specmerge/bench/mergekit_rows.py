"""mergekit's merges of the full experts, as peer rows of ``specmerge bench lm`` and
``bench text8`` (``--experts full --mergekit-venv DIR``).

``DIR`` is a virtualenv holding mergekit 0.1.5 (made beforehand, for example by
``benchmarks/peers/mergekit_parity.py``'s ``ensure_mergekit``; the benchmark installs nothing).
Each row writes a mergekit YAML into the run's merge directory and runs
``DIR/bin/mergekit-yaml RECIPE OUT --allow-crimes --no-copy-tokenizer --quiet --random-seed S
--device D [-j THREADS]`` as a subprocess, its output in a log file beside the recipe. Its
output directory is scored by the same evaluator call as every specmerge row. A row records
``merge_s``, the wall time of that command (an interpreter start, mergekit's imports and the
merge, as a user runs it; specmerge's rows time ``specmerge.merge`` in-process), ``startup_s``,
the wall time of ``mergekit-yaml --help`` just before (the interpreter start and the imports
alone, which ``merge_s`` includes), and ``peak_rss_mb``, the largest RSS of the command's
process tree, sampled every 50 ms.

Each row mirrors the specmerge row of the same merge (its recipe in the bench's recipes
directory, ``examples/text8``, with its method's registry defaults), in mergekit's terms
(mergekit 0.1.5's generalized task arithmetic, see ``specmerge.mergekit``); weights are 1:

| row | mergekit recipe | the specmerge row it mirrors |
|---|---|---|
| mergekit_linear | linear, normalize true, no base_model | weight_average: θ0 + Σ τ_i / K |
| mergekit_task_arithmetic | task_arithmetic, λ = scaling | task_arithmetic (scaling 0.3) |
| mergekit_ties | ties, density = density, λ = scaling, normalize = (aggregate is mean) | ties (density 0.2, mean, scaling 1) |
| mergekit_dare_ties | dare_ties, density = 1 − drop_rate, λ = scaling, rescale | dare (drop_rate 0.5, scaling 0.3), plus TIES's sign election |
| mergekit_slerp | slerp of experts 1 and 2, t = 0.5 (base_model: expert 1) | none: a merge of the first two experts only |

Known differences: mergekit's ties keeps exactly max(1, ⌊ρd⌋) entries of each τ_i by argsort,
where the ties row keeps ⌊ρd⌋ + 1 (``trim_count: official``, TIES's code) and every entry tied
at the threshold, and where the weighted vote is exactly 0 mergekit elects +; mergekit's
dare_ties rescales the survivors to keep each τ_i's L1 norm, where dare rescales by 1/(1 − p).
mergekit merges every tensor, embeddings included, where the row recipes average the
embeddings' τ_i: the same for bench lm, whose experts leave the embeddings untouched.
``--random-seed`` is the mirrored recipe's ``seed``. The row cache key holds the mergekit
version, the recipe and the flags.

On text8's all-MiniLM-L6-v2 (a BERT), mergekit 0.1.5 itself fails while planning, whatever the
method (``TypeError: can only concatenate list (not "tuple") to list`` in ``plan.py``'s
``plan_tensor``, on an optional weight with aliases); the rows record that error, and run on
``bench lm``'s Llama.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import text8 as T

log = logging.getLogger(__name__)

PREFIX = "mergekit_"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
ROWS = tuple(PREFIX + m for m in METHODS)
VERSION = "0.1.5"
# the specmerge row recipe each mergekit row mirrors (slerp has none)
MIRRORS = {"linear": "weight_average", "task_arithmetic": "task_arithmetic", "ties": "ties",
           "dare_ties": "dare"}
SLERP_T = 0.5  # the middle of the arc (specmerge's slerp default)
DTYPE = "float32"  # as every row recipe
FLAGS = ("--allow-crimes", "--no-copy-tokenizer", "--quiet")
LABELS = {"mergekit_linear": "mergekit linear", "mergekit_task_arithmetic":
          "mergekit task_arithmetic", "mergekit_ties": "mergekit ties",
          "mergekit_dare_ties": "mergekit dare_ties",
          "mergekit_slerp": "mergekit slerp (experts 1 and 2 only, t=0.5)"}
HOW = (f"make one with `python -m venv DIR && DIR/bin/pip install 'mergekit=={VERSION}'` (pin "
       "torch to the one specmerge runs first, as ensure_mergekit in "
       "benchmarks/peers/mergekit_parity.py does, which makes one)")


def is_mergekit_row(row: str) -> bool:
    return row.startswith(PREFIX)


def method(row: str) -> str:
    """``mergekit_dare_ties`` → ``dare_ties``; a clear error for an unknown one."""
    name = row.removeprefix(PREFIX)
    if name not in METHODS:
        raise T.BenchError(f"unknown mergekit row {row!r}: the mergekit rows are {list(ROWS)}")
    return name


def check_row(row: str, venv: Path | None, lora: bool) -> str:
    """Refuse a mergekit row that cannot run (LoRA experts, no virtualenv); its version."""
    method(row)
    if lora:
        raise T.BenchError(f"row {row!r} merges full checkpoints with mergekit: it needs "
                           "--experts full (with --experts lora, the peft_* rows are the peers)")
    if venv is None:
        raise T.BenchError(f"row {row!r} runs mergekit {VERSION}: pass --mergekit-venv DIR, a "
                           f"virtualenv holding mergekit=={VERSION}; {HOW}")
    return mergekit_version(venv)


def mergekit_version(venv: Path) -> str:
    """The version of mergekit installed in ``venv``, from its dist-info (nothing is run)."""
    venv = Path(venv).expanduser()
    if not os.access(venv / "bin" / "mergekit-yaml", os.X_OK):
        raise T.BenchError(f"--mergekit-venv {venv}: no executable bin/mergekit-yaml; {HOW}")
    infos = sorted(venv.glob("lib/python*/site-packages/mergekit-*.dist-info"))
    if not infos:
        raise T.BenchError(f"--mergekit-venv {venv}: no mergekit-*.dist-info under "
                           f"lib/python*/site-packages; {HOW}")
    version = infos[-1].name.removeprefix("mergekit-").removesuffix(".dist-info")
    if version != VERSION:
        log.warning("--mergekit-venv %s holds mergekit %s; the rows follow mergekit %s's "
                    "parameters (the version is recorded in each row)", venv, version, VERSION)
    return version


def mirrored(recipes: Path, name: str) -> tuple[dict, int]:
    """The parameters of the specmerge row recipe ``name`` over its method's defaults, and
    its seed."""
    import yaml

    from specmerge.methods.registry import get_method

    path = Path(recipes) / f"{name}.yaml"
    if not path.is_file():
        raise T.BenchError(f"the mergekit rows mirror the row recipe {path}, which is missing")
    rec = yaml.safe_load(path.read_text())
    params = {**get_method(rec["merge_method"]).defaults(), **(rec.get("parameters") or {})}
    for k, v in params.items():
        if k in ("scaling", "density", "drop_rate") and not isinstance(v, (int, float)):
            raise T.BenchError(f"{path}: the mergekit rows need a number for {k}, got {v!r}")
    return params, int(rec.get("seed") or 0)


def template(name: str, k: int, recipes: Path) -> tuple[dict, int]:
    """The mergekit recipe of row ``mergekit_<name>`` for K experts, with the placeholders
    BASE and EXPERT_1 … EXPERT_K for paths, and its random seed."""
    experts = [f"EXPERT_{i + 1}" for i in range(k)]
    if name == "slerp":
        if k < 2:
            raise T.BenchError("row 'mergekit_slerp' merges two experts; this run has one")
        return {"merge_method": "slerp", "base_model": experts[0],
                "models": [{"model": e} for e in experts[:2]],
                "parameters": {"t": SLERP_T}, "dtype": DTYPE}, 0
    p, seed = mirrored(recipes, MIRRORS[name])
    each: dict = {"weight": 1.0}
    if name == "linear":
        models = [{"model": e, "parameters": each} for e in experts]
        return {"merge_method": "linear", "models": models, "parameters": {"normalize": True},
                "dtype": DTYPE}, seed
    if name == "task_arithmetic":
        shared = {"lambda": float(p["scaling"]), "normalize": False}
    elif name == "ties":
        each = {**each, "density": float(p["density"])}
        shared = {"lambda": float(p["scaling"]), "normalize": p["aggregate"] == "mean"}
    else:  # dare_ties
        each = {**each, "density": 1.0 - float(p["drop_rate"])}
        shared = {"lambda": float(p["scaling"]), "normalize": False, "rescale": True}
    return {"merge_method": name, "base_model": "BASE",
            "models": [{"model": e, "parameters": dict(each)} for e in experts],
            "parameters": shared, "dtype": DTYPE}, seed


def substitute(obj, paths: dict[str, str]):
    """``obj`` with each placeholder string replaced by its path."""
    if isinstance(obj, dict):
        return {k: substitute(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, paths) for v in obj]
    return paths.get(obj, obj) if isinstance(obj, str) else obj


@dataclass
class Watched:
    returncode: int
    seconds: float
    peak_rss_mb: float


def run_watched(cmd: list[str], log_file: Path, env: dict[str, str],
                interval: float = 0.05) -> Watched:
    """Run ``cmd`` (stdout and stderr into ``log_file``) while a thread samples the summed RSS
    of its process tree every ``interval`` seconds."""
    import psutil

    peak, stop = [0], threading.Event()

    def sample(pid: int) -> None:
        while not stop.is_set():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            stop.wait(interval)

    with open(log_file, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        rc = proc.wait()
        secs = time.perf_counter() - t0
        stop.set()
        sampler.join()
    return Watched(rc, secs, peak[0] / 2**20)


@dataclass
class MergekitJob:
    """One mergekit row: the recipe template, its seed, and the virtualenv that runs it."""

    row: str
    venv: Path
    version: str
    recipe: dict
    seed: int
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, row: str, recipes: Path, venv: Path | None, experts: list[str]
              ) -> MergekitJob:
        """``experts``: the experts' task names, in the order the run lists them."""
        version = check_row(row, venv, lora=False)
        assert venv is not None
        recipe, seed = template(method(row), len(experts), recipes)
        notes = ([f"slerp of the {experts[0]} and {experts[1]} experts only, t = {SLERP_T} "
                  f"(mergekit's slerp takes two models)"] if method(row) == "slerp" else [])
        return cls(row, Path(venv).expanduser(), version, recipe, seed, notes)

    def identity(self) -> dict:
        """What the row's result depends on beside the experts and the evaluation sets."""
        return {"mergekit_version": self.version, "mergekit": self.recipe, "seed": self.seed,
                "flags": list(FLAGS)}

    def command(self, recipe_file: Path, out: Path, device: str, threads: int | None
                ) -> list[str]:
        return [str(self.venv / "bin" / "mergekit-yaml"), str(recipe_file), str(out), *FLAGS,
                "--random-seed", str(self.seed), "--device", device,
                *(["-j", str(threads)] if threads else [])]

    def run(self, base: Path, experts: list[Path], out: Path, device: str = "cpu",
            threads: int | None = None, logs: Path | None = None) -> dict:
        """Write the recipe beside ``out``, run mergekit-yaml into ``out``; the row's record
        (time, memory, version, recipe). A failure is a BenchError naming the row and the
        log's last line; the log is kept in ``logs`` then."""
        import yaml

        paths = {"BASE": str(base), **{f"EXPERT_{i + 1}": str(p) for i, p in enumerate(experts)}}
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        recipe_file = out.with_name(f"{out.name}.yaml")
        recipe_file.write_text(yaml.safe_dump(substitute(self.recipe, paths), sort_keys=False))
        log_file = out.with_name(f"{out.name}.log")
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = self.command(recipe_file, out, device, threads)
        startup = run_watched(cmd[:1] + ["--help"], log_file, env)
        run = run_watched(cmd, log_file, env)
        if run.returncode != 0:
            lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
            where = log_file
            if logs is not None:  # the work directory goes at the end of the run; the log stays
                logs.mkdir(parents=True, exist_ok=True)
                where = Path(shutil.copy(log_file, logs / log_file.name))
            raise T.BenchError(f"row {self.row!r}: mergekit-yaml exited with status "
                               f"{run.returncode}: {lines[-1] if lines else '(no output)'} "
                               f"(log: {where})")
        if not any(out.glob("*.safetensors")):
            raise T.BenchError(f"row {self.row!r}: mergekit-yaml wrote no safetensors to {out}")
        return {"merge_s": run.seconds, "peak_rss_mb": run.peak_rss_mb,
                "startup_s": startup.seconds if startup.returncode == 0 else None,
                "mergekit_version": self.version, "mergekit": self.recipe,
                "command": " ".join(cmd[:1] + ["RECIPE", "OUT"] + cmd[3:]),
                **({"notes": self.notes} if self.notes else {})}

