"""The reference numbers of tests/golden/spaces.json, from the official Core Space and KnOTS code.

    python benchmarks/peers/spaces_reference.py OUT.json CORE_DIR KNOTS_DIR

CORE_DIR: a checkout of apanariello4/core-space-merging at 85176fab749578b0b54a027ea89495846e79757d;
KNOTS_DIR: a checkout of gstoica27/KnOTS at baa35e85768b8841820d35edc3e41b25304248c5 (e.g. from
the ``fetch`` tool). Their ``task_merger`` modules are imported as they are (a stub ``utils``
replaces the one that imports clip, peft and transformers); nothing of them is copied here.
Needs torch and einops (which the official task_merger imports), e.g. in a throwaway venv.
"""
import inspect
import json
import sys
import types
from types import SimpleNamespace

import torch


def load(dirname, tag):
    """Import an official repo's task_merger with a stub `utils` (its real one imports clip,
    peft, transformers); the stub's two lookups are the official ones' logic."""
    for m in ("masking_ops", "merging_functions", "task_merger", "utils"):
        sys.modules.pop(m, None)
    sys.path.insert(0, dirname)
    import masking_ops
    import merging_functions
    utils = types.ModuleType("utils")
    utils.get_mask_fn = lambda name: dict((k.replace('_masking', ''), v) for k, v in inspect.getmembers(masking_ops, inspect.isfunction) if '_masking' in k)[name]
    utils.get_merging_fn = lambda name: dict((k.replace('_merging', ''), v) for k, v in inspect.getmembers(merging_functions, inspect.isfunction) if '_merging' in k)[name]
    sys.modules["utils"] = utils
    import task_merger
    sys.path.remove(dirname)
    return task_merger, masking_ops

torch.manual_seed(0)
m, n, r, K = 12, 10, 2, 3
Bs = [torch.randn(m, r, dtype=torch.float64) for _ in range(K)]
As = [torch.randn(r, n, dtype=torch.float64) for _ in range(K)]
dWs = [b @ a for b, a in zip(Bs, As, strict=True)]
out = {"inputs": {"B": [b.tolist() for b in Bs], "A": [a.tolist() for a in As], "scale": 1.0}}

# ---- Core Space: apanariello4/core-space-merging, task_merger.py MatrixPerLayerMerger
tm, _ = load(sys.argv[2], "core")
M = tm.MatrixPerLayerMerger
fake = SimpleNamespace(cache={}, lmc=False)
fake._process_ties = lambda *a, **k: M._process_ties(fake, *a, **k)
fake.get_tsv_delta_w = lambda *a, **k: M.get_tsv_delta_w(fake, *a, **k)
key = "w"
ab = [{key: (a, b)} for a, b in zip(As, Bs, strict=True)]
M_list, U_ref, Vh_ref = M.get_core_matrices(fake, ab, key, {})
def core(cfg):
    merged = M._merge_tensors(fake, [c.clone() for c in M_list], cfg)
    if cfg.get("isotropize", False):
        merged = tm.isotropize_matrix(merged)
    return (U_ref @ merged @ Vh_ref).tolist()
out["core"] = {
    "task_arithmetic": core({"merge_method": "tv"}),
    "ties_topK20": core({"merge_method": "ties", "topK": 20}),
    "tsv": core({"merge_method": "tsv"}),
    "iso_c": core({"merge_method": "tv", "isotropize": True}),
}
def tsv_fn(vs):
    return M.get_tsv_delta_w(fake, vs)

# ---- KnOTS: gstoica27/KnOTS, task_merger.py SVDMerger.apply_svd / merge, masking_ops.py
tk, mo = load(sys.argv[3], "knots")
S = tk.SVDMerger
kf = SimpleNamespace(device="cpu")
kf.variable_extend_dim = lambda *a, **k: S.variable_extend_dim(kf, *a, **k)
kf.dict_of_concat_matrices = lambda *a, **k: S.dict_of_concat_matrices(kf, *a, **k)
U, task_Ss, task_sVs, _ = S.apply_svd(kf, [{key: d} for d in dWs], concat_across_output=True)
reps = [v[key].reshape(-1) for v in task_sVs]  # one tensor: directions_to_reps is this flatten
def knots(method, topK, merging_type):
    masks = mo.__dict__[f"{method}_masking"](reps, topK=topK, sign_resolve_mode="sum_of_values")
    masked = torch.vstack(reps).clone() * masks
    pre = [{key: x.reshape(task_sVs[0][key].shape)} for x in masked]
    rescaled = S.apply_Ss_on_Vs(kf, pre, task_Ss)
    vecs = torch.stack([x[key].reshape(-1) for x in rescaled])
    merged = mo.masked_merge(vectors=vecs, merge_func=merging_type, weights=None)
    return (U[key] @ merged.reshape(task_sVs[0][key].shape)).double().tolist()
out["knots"] = {
    "task_arithmetic": knots("tv", 100, "sum"),
    "ties_topK20": knots("ties", 20, "mean"),
    # TSV-M on the KnOTS right factors Σ V_i (core-space repo's get_tsv_delta_w), lifted by U
    "tsv": (U[key].double() @ tsv_fn([v[key].double() for v in task_sVs])).tolist(),
}
out["dense_sum"] = sum(dWs).tolist()
out["source"] = {
    "note": "generated once by a throwaway script (/tmp) importing the official modules, with a "
            "stub utils (get_mask_fn/get_merging_fn) and einops 0.8.2; inputs float64, "
            "torch.manual_seed(0), m=12, n=10, r=2, K=3, scale 1 (alpha = r); scaling 1",
    "core": {"repo": "apanariello4/core-space-merging",
             "commit": "85176fab749578b0b54a027ea89495846e79757d",
             "functions": "task_merger.py: MatrixPerLayerMerger.get_core_matrices (L527-560), "
                          "_merge_tensors (L591-619: tv, ties topK=20, tsv), isotropize_matrix "
                          "(L699, with merge_method tv = Iso-C), lift U_B_ref @ M @ Vh_A_ref "
                          "as merge() (L672-688)"},
    "knots": {"repo": "gstoica27/KnOTS",
              "commit": "baa35e85768b8841820d35edc3e41b25304248c5",
              "functions": "task_merger.py: SVDMerger.apply_svd (L294-322, Sigma V_i), the steps "
                           "of SVDMerger.merge (L384-432): masking_ops.ties_masking / tv_masking, "
                           "apply_Ss_on_Vs, masked_merge (mean for ties, sum for tv), U @ merged; "
                           "tsv: core-space-merging's get_tsv_delta_w on the KnOTS Sigma V_i"},
}
json.dump(out, open(sys.argv[1], "w"))
print("ok", U[key].shape, M_list[0].shape)
