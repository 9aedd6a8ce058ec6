"""specmerge against mergekit 0.1.5 on mergekit's own recipes: every method and recipe feature.

It installs mergekit 0.1.5 into a throw-away virtualenv of its own (never into specmerge's), with
the torch that specmerge runs so that pip pulls no CUDA wheels. It builds small float32 Llama
stand-ins with transformers (a base and 3 experts of 40 layers, and a 2-layer pair with a
1,048,576-entry embedding), then runs every case of ``mergekit_cases.py`` through both tools:
``mergekit-yaml`` and ``specmerge merge`` on the very same YAML file. Per case it reports, worst
over tensors, the relative difference ‖a_t − b_t‖ / ‖b_t‖, the ulp distance and the largest
|a_t − b_t| in ulps of the tensor's largest entry (``compare.compare_dirs``); for the random
methods (DARE, DELLA, arcee_fusion's sampled quartiles) the update norms and changed-entry
shares instead; or specmerge's refusal.

Cases: all 20 of mergekit's methods (with gradients, filters, slices, passthrough, recipes
without base_model) and mergekit's six example recipes (examples/mergekit/*.yml), as written
and in float32.

    python benchmarks/peers/mergekit_parity.py [--venv DIR] [--out PATH] [--cases PREFIX ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare, mergekit_cases

import torch  # noqa: E402
import yaml  # noqa: E402
from compare import compare_dirs  # noqa: E402
from mergekit_cases import CASES, NOTES, RANDOM, example_cases  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT = "mergekit==0.1.5"
VENV_DEFAULT = Path(tempfile.gettempdir()) / "specmerge-mergekit-venv"
LAYERS = 40  # the stand-ins' depth: mergekit's examples' layer ranges apply as written


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_mergekit(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if (venv / "bin" / "mergekit-yaml").exists():
        return venv / "bin" / "mergekit-yaml"
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the very torch specmerge runs, local label included (2.13.0+cpu: the CPU wheel, found
    # through pip's find-links), so that mergekit's requirements pull no CUDA wheels
    pin = f"torch=={torch.__version__}"
    run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    (venv / "constraints.txt").write_text(pin + "\n")
    res = run([str(py), "-m", "pip", "install", "-q", MERGEKIT, "-c",
               str(venv / "constraints.txt")])
    if res.returncode:
        sys.exit(f"pip install {MERGEKIT} failed:\n{res.stderr[-2000:]}")
    return venv / "bin" / "mergekit-yaml"


def build_models(root: Path) -> dict[str, Path]:
    """BASE and EXPERT_1..3: float32 Llamas of hidden 32 and 40 layers (vocab 96); BIG_A and
    BIG_B: 2 layers, vocab 32768, so that the embedding has 1,048,576 entries (> 1M)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {}
    for names, vocab, layers in ((["BASE", "EXPERT_1", "EXPERT_2", "EXPERT_3"], 96, LAYERS),
                                 (["BIG_A", "BIG_B"], 32768, 2)):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        base_sd = {n: p.clone() for n, p in model.state_dict().items()}
        for i, name in enumerate(names):
            if i:
                with torch.no_grad():
                    model.load_state_dict(base_sd)
                    for p in model.parameters():
                        p.add_(0.02 * torch.randn_like(p))
            paths[name] = root / name.lower()
            model.save_pretrained(paths[name])
    return paths


def substitute(obj: Any, paths: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        return {k: substitute(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, paths) for v in obj]
    return str(paths[obj]) if isinstance(obj, str) and obj in paths else obj


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def random_stats(ours: Path, theirs: Path, base: Path) -> str:
    """For a random method: per tensor, the update's norm ‖out − θ0‖ and the share of entries
    it changes, specmerge's over mergekit's; the worst ratios over tensors."""
    a, b, t0 = tensors(ours), tensors(theirs), tensors(base)
    norm, kept = [], []
    for n in sorted(set(a) & set(b) & set(t0)):
        da, db = a[n].double() - t0[n].double(), b[n].double() - t0[n].double()
        if float(db.norm()) == 0.0:
            continue
        norm.append(float(da.norm() / db.norm()))
        kept.append(float((da != 0).double().mean() / (db != 0).double().mean().clamp_min(1e-30)))
    return (f"update norm ratio {min(norm):.3f}–{max(norm):.3f}, changed-entry share ratio "
            f"{min(kept):.3f}–{max(kept):.3f} over {len(norm)} tensors")


def verdict(cmp: dict[str, Any]) -> str:
    if cmp["max_ulp"] == 0:
        return "identical"
    if 0 <= cmp["max_ulp"] <= 1:
        return "≤ 1 ulp"
    if cmp["scaled_ulp"] <= 1.0:
        return "≤ 1 ulp of each tensor's largest entry"
    if cmp["scaled_ulp"] <= 3.0 and cmp["max_rel"] < 1e-6:
        return "≤ 3 ulps of each tensor's largest entry (order of the arithmetic: notes)"
    return "differs"


def mask_flips(ours: Path, theirs: Path, paths: dict[str, Path], recipe: dict[str, Any],
               cmp: dict[str, Any]) -> str:
    """The note of an arcee_fusion case whose masks differ: how many entries flip, and whether
    every differing entry is a flip (θ0 in one output, θ1 in the other)."""
    base_key = recipe.get("base_model", "BASE")
    expert_key = next(m["model"] for m in recipe["models"] if m["model"] != base_key)
    th0, th1 = (tensors(paths[k]) for k in (base_key, expert_key))
    a, b = tensors(ours), tensors(theirs)
    other = 0
    for k, x in a.items():
        y, t0, t1 = b[k], th0[k].to(x.dtype), th1[k].to(x.dtype)
        def at(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # equal, or 1 ulp apart
            return torch.isclose(u, v, rtol=2 * torch.finfo(u.dtype).eps, atol=0)
        flip = (at(x, t0) & at(y, t1)) | (at(x, t1) & at(y, t0))
        other += int(((x != y) & ~flip).sum())
    share = cmp["differing"] / max(1, cmp["entries"])
    return (f"masks differ at {cmp['differing']} of {cmp['entries']} entries ({share:.1e}), "
            + ("each a flip between θ0 and θ1 (to 1 ulp)" if other == 0 else f"{other} not flips")
            + ": specmerge takes the importances in float64, mergekit in float32, where the KL "
            "loses its digits to cancellation (notes)")


def kept_header(doc: Path) -> str:
    """The provenance line of an earlier version of the page, up to its first re-run."""
    if not doc.exists():
        return ""
    line = next((ln for ln in doc.read_text().splitlines() if ln.startswith("Produced by")), "")
    return line.split(" Re-run for the cases", 1)[0]


def kept_rows(doc: Path) -> dict[str, str]:
    """The table rows of an earlier version of the page, by case (kept by ``--cases``)."""
    if not doc.exists():
        return {}
    text = doc.read_text().split(NOTES_MARKER, 1)[0]
    return {ln.split(" | ", 1)[0].removeprefix("| "): ln for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| case |")}


def run_case(case: str, recipe: dict[str, Any], paths: dict[str, Path], root: Path,
             mergekit_yaml: Path) -> tuple[str, ...]:
    """Both tools on one recipe; the table row."""
    cfg = root / "recipe.yml"
    cfg.write_text(yaml.safe_dump(substitute(recipe, paths), sort_keys=False))
    mk_out, sm_out = root / "mk", root / "sm"
    shutil.rmtree(mk_out, ignore_errors=True)
    shutil.rmtree(sm_out, ignore_errors=True)
    mk = run([str(mergekit_yaml), str(cfg), str(mk_out), "--allow-crimes",
              "--no-copy-tokenizer", "--random-seed", "0"])
    sm = run([sys.executable, "-m", "specmerge.cli", "merge", "--quiet", str(cfg),
              str(sm_out)], cwd=ROOT)
    sm_err = next((ln for ln in sm.stderr.splitlines() if ln.startswith("error:")),
                  sm.stderr.strip()[-200:])
    mk_state = "ran" if mk.returncode == 0 else \
        "failed: " + (mk.stderr.strip().splitlines() or ["?"])[-1][:120]
    if sm.returncode or mk.returncode:
        return (case, mk_state, "ran" if sm.returncode == 0 else "refused: " + sm_err[:160],
                "–", "–", "–", "–", "")
    cmp = compare_dirs(sm_out, mk_out)
    n = len(cmp["per_tensor"])
    over = sum(t["scaled_ulp"] > 1.0 for t in cmp["per_tensor"].values())
    rel = f"{cmp['max_rel']:.2e}" + (f" ({cmp['max_rel_tensor']})" if cmp["max_rel"] else "")
    ulp = "dtypes differ" if cmp["max_ulp"] < 0 else \
        f"{cmp['max_ulp']} / {cmp['scaled_ulp']:.2f}"
    dtype = recipe.get("dtype", "float32")
    if cmp["missing"]:
        note = f"tensor sets differ: {cmp['missing'][:3]}"
    elif case in RANDOM:
        base = paths[recipe.get("base_model", "BASE")]
        note = f"random: {RANDOM[case]}; {random_stats(sm_out, mk_out, base)}"
    elif recipe.get("merge_method") == "arcee_fusion" and verdict(cmp) == "differs" \
            and dtype == "float32":
        note = mask_flips(sm_out, mk_out, paths, recipe, cmp)
    else:
        note = verdict(cmp) + (f"; {NOTES[dtype]}" if dtype in NOTES and over else "")
    print(f"{case}: rel {cmp['max_rel']:.2e}, ulp {ulp}", file=sys.stderr, flush=True)
    return (case, "ran", "ran", str(n), rel, ulp, str(over), note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=VENV_DEFAULT)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "mergekit_parity.md")
    ap.add_argument("--cases", nargs="*", help="only the cases whose name starts so")
    args = ap.parse_args()

    mergekit_yaml = ensure_mergekit(args.venv)
    everything = {**CASES, **example_cases()}
    cases = {c: r for c, r in everything.items()
             if not args.cases or any(c.startswith(p) for p in args.cases)}
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = build_models(root / "models")
        fresh = {c: "| " + " | ".join(run_case(c, r, paths, root, mergekit_yaml)) + " |"
                 for c, r in cases.items()}
    old = kept_rows(args.out) if args.cases else {}  # --cases: the other rows stay as they were
    rows = [fresh.get(c) or old.get(c) for c in everything]
    minutes, load1 = (time.perf_counter() - t0) / 60, os.getloadavg()[0]
    prior = kept_header(args.out) if args.cases else ""
    rerun = (f" Re-run for the cases {', '.join(args.cases)} (load average {load0:.1f} at the "
             f"start and {load1:.1f} at the end, {minutes:.1f} min); every other row is from "
             "the run this sentence follows." if args.cases else "")
    lines = ["# specmerge vs mergekit 0.1.5: parity on mergekit recipes", "",
             prior + rerun if prior else
             f"Produced by `python benchmarks/peers/mergekit_parity.py` ({MERGEKIT} in its own "
             f"virtualenv, torch {torch.__version__}, CPU, {os.cpu_count()} cores, load average "
             f"{load0:.1f} at the start and {load1:.1f} at the end, {minutes:.1f} min). "
             f"Stand-in models: float32 Llamas of hidden 32 and {LAYERS} layers (vocab 96), a "
             "base and 3 experts, θ_i = θ0 + 0.02·N(0, 1); and a 2-layer pair with a 32768-row "
             "vocabulary (a 1,048,576-entry embedding) for arcee_fusion's sampled quantiles. "
             "Both tools read the very same mergekit YAML file (mergekit with `--random-seed 0`)."
             " mergekit's example recipes are examples/mergekit/*.yml with their models mapped, "
             "in order, to the base and the experts; their layer ranges apply as written.", "",
             "Per tensor: the relative difference ‖specmerge − mergekit‖ / ‖mergekit‖ and the ulp "
             "distance of its worst entry, and the largest |difference| in ulps of that tensor's "
             "largest entry (an entry near 0 has a tiny ulp, which the plain distance "
             "exaggerates). The columns give the worst over the tensors, and how many tensors "
             "exceed 1 ulp of their largest entry. Random methods are compared by statistics.", "",
             "| case | mergekit | specmerge | tensors | max rel. difference (tensor) | "
             "max ulp / max \\|diff\\| in ulps of the largest entry | tensors over 1 ulp | note |",
             "|---|---|---|---:|---|---|---:|---|"]
    lines += [r for r in rows if r]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    notes = args.out.read_text().split(NOTES_MARKER, 1)[1] if args.out.exists() and \
        NOTES_MARKER in args.out.read_text() else "\n## Notes\n\n(none yet)\n"
    args.out.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    print("\n".join(lines))
    print(json.dumps({"written": str(args.out)}), file=sys.stderr)


NOTES_MARKER = "<!-- notes: written by hand, kept when mergekit_parity.py rewrites the table -->\n"


if __name__ == "__main__":
    main()
