"""Element-wise merges: weight average, task arithmetic, TIES, DARE.

All functions take the task vectors τ_i = θ_i − θ_0 of one parameter and return the merged
update τ (the engine adds θ_0). They apply to every floating parameter, whatever its shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from specmerge.lowrank import TaskVector, all_factored, concat, dense
from specmerge.methods.registry import Interval, register
from specmerge.methods.rng import CHUNK as RNG_CHUNK
from specmerge.methods.rng import CounterRNG


def _weights(task_vectors: Sequence[Tensor], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(task_vectors)
    if len(weights) != len(task_vectors):
        raise ValueError(f"got {len(weights)} weights for {len(task_vectors)} task vectors")
    return [float(w) for w in weights]


def weighted_sum(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Σ_i w_i τ_i, accumulated in place (one output buffer, no K-fold stack)."""
    ws = _weights(task_vectors, weights)
    out = torch.zeros_like(task_vectors[0])
    for w, tau in zip(ws, task_vectors, strict=True):
        out.add_(tau, alpha=w)
    return out


def _nonzero_weight_sum(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    if sum(weights) == 0:
        raise ValueError(f"the models' weights {list(weights)} sum to zero; weight_average "
                         f"divides by their sum")


@register(
    "weight_average",
    family="elementwise",
    summary="θ0 + Σ w_i τ_i / Σ w_i: the plain (weighted) mean of the experts.",
    citation="Wortsman et al., Model soups, ICML 2022, arXiv 2203.05482",
    docs={},
    uses_weights=True,
    factored=True,
    rowwise=True,
    propagates_nonfinite=True,
    check=_nonzero_weight_sum,
)
def weight_average(task_vectors: Sequence[TaskVector], *, weights: Sequence[float] | None = None
                   ) -> TaskVector:
    """τ = Σ_i w_i τ_i / Σ_i w_i; with unit weights, the mean of the task vectors. Factored
    τ_i (all of them) give a factored τ, their factors concatenated (rank Σ r_i)."""
    ws = _weights(task_vectors, weights)
    total = sum(ws)
    if total == 0:
        raise ValueError("weight_average: the model weights sum to zero")
    if all_factored(task_vectors):
        return concat(task_vectors, [w / total for w in ws])  # type: ignore[arg-type]
    return weighted_sum([dense(t) for t in task_vectors], ws).div_(total)


@register(
    "task_arithmetic",
    family="elementwise",
    summary="θ0 + λ Σ w_i τ_i.",
    citation="Ilharco et al., Editing models with task arithmetic, ICLR 2023, arXiv 2212.04089",
    docs={"scaling": "λ, the scaling coefficient applied to the sum of task vectors"},
    uses_weights=True,
    factored=True,
    rowwise=True,
    propagates_nonfinite=True,
)
def task_arithmetic(task_vectors: Sequence[TaskVector], *, weights: Sequence[float] | None = None,
                    scaling: float = 0.3) -> TaskVector:
    """τ = λ Σ_i w_i τ_i, with λ = ``scaling`` (default 0.3, Ilharco et al.). Factored τ_i (all
    of them) give a factored τ, their factors concatenated (rank Σ r_i)."""
    ws = _weights(task_vectors, weights)
    if all_factored(task_vectors):
        return concat(task_vectors, [w * scaling for w in ws])  # type: ignore[arg-type]
    return weighted_sum([dense(t) for t in task_vectors], ws).mul_(scaling)


TrimCount = Literal["official", "exact"]


def trim_rank(numel: int, density: float, rule: TrimCount = "official") -> int:
    """TIES's rank k over d = ``numel`` entries: the threshold t is the k-th smallest |τ|, and
    the entries with |τ| ≥ t are kept (of distinct magnitudes: d − k + 1 of them).

    - ``official`` (TIES's code, ``topk_values_mask``): k = d − ⌊d·density⌋, so ⌊d·density⌋ + 1
      entries are kept;
    - ``exact`` (mergekit 0.1.5, ``mergekit/sparsify.py: magnitude``, which keeps the
      ``max(1, int(density * tensor.numel()))`` largest |τ| by argsort): k = d − max(1,
      ⌊d·density⌋) + 1, so max(1, ⌊d·density⌋) entries are kept. Where magnitudes tie at t,
      every tied entry is kept (mergekit's argsort keeps an arbitrary subset of them).

    k ≤ 0 (density 1 by the official rule, or no entries) means nothing is trimmed.
    """
    kept = int(numel * density)
    if rule == "exact":
        return numel - max(1, kept) + 1
    return numel - kept


CHUNK = 1 << 20  # entries per slice in chunked loops: bounds temporaries to 4 MB (float32)


class AbsKthSelector:
    """Exact k-th smallest |x| (1-based, as ``kthvalue``) over data fed in chunks.

    |x| of an IEEE-754 float orders like its bit pattern read as an integer, so a radix
    selection finds the k-th value exactly: each pass histograms the next 16 bits of the keys
    of the entries that share the prefix found so far (2 passes for float32, 4 for float64).
    Memory is one 65,536-bin histogram, whatever the data size; the data may be one tensor or
    a whole model streamed from disk (TIES' ``trim_scope: global``).
    """

    def __init__(self, k: int, dtype: torch.dtype):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.key_dtype = torch.int64 if self.dtype == torch.float64 else torch.int32
        self.passes = self.dtype.itemsize * 8 // 16
        self.level, self.prefix, self.remaining = 0, 0, k
        self.hist = torch.zeros(1 << 16, dtype=torch.int64)

    @property
    def done(self) -> bool:
        return self.level == self.passes

    def histogram(self, x: Tensor) -> Tensor:
        """The current pass's 65,536-bin histogram of ``x`` (int64, on the CPU); reads no state
        but the pass and prefix, so histograms of parts of the data add up exactly."""
        shift = (self.passes - 1 - self.level) * 16
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for chunk in x.reshape(-1).split(CHUNK):
            keys = chunk.abs().to(self.dtype).view(self.key_dtype)
            if self.level:
                keys = keys[(keys >> (shift + 16)) == self.prefix]
            hist += torch.bincount(((keys >> shift) & 0xFFFF).long().cpu(), minlength=1 << 16)
        return hist

    def update(self, x: Tensor) -> None:
        """Feed data for the current pass (call with all the data, once per pass)."""
        self.hist += self.histogram(x)

    def next_pass(self) -> None:
        cum = self.hist.cumsum(0)
        if int(cum[-1]) < self.remaining:
            raise ValueError(f"asked for the {self.remaining}-th value of {int(cum[-1])}")
        bucket = int(torch.searchsorted(cum, self.remaining))
        self.remaining -= int(cum[bucket - 1]) if bucket else 0
        self.prefix = (self.prefix << 16) | bucket
        self.level += 1
        self.hist.zero_()

    def value(self) -> float:
        if not self.done:
            raise RuntimeError("selection not finished: feed every pass first")
        return float(torch.tensor([self.prefix], dtype=self.key_dtype).view(self.dtype))


def kth_smallest_abs(x: Tensor, k: int) -> float:
    """The k-th smallest |x| (1-based), exactly as ``x.abs().kthvalue(k)``, in O(numel)."""
    if not 1 <= k <= x.numel():
        raise ValueError(f"k={k} out of range for {x.numel()} entries")
    sel = AbsKthSelector(k, x.dtype)
    while not sel.done:
        sel.update(x)
        sel.next_pass()
    return sel.value()


@dataclass
class TrimState:
    """Where the whole-model TIES threshold search stands: one selector per task, or none when
    nothing is trimmed (density 1)."""

    num_experts: int
    selectors: list[AbsKthSelector] | None


@dataclass(frozen=True)
class TrimThresholds:
    """TIES's thresholds t_i: the k-th smallest |τ_i| over d entries (k = ``trim_rank`` by the
    ``trim_count`` rule; official: d − ⌊d·density⌋), where the entries are every parameter TIES
    merges (``scope`` "global", for ``trim_scope: global``) or one parameter read in row blocks
    (``scope`` "tensor", the default ``trim_scope``).

    Exact, without holding the data: each round streams every part once and histograms
    16 bits of |τ_i| (``AbsKthSelector``; 2 rounds in float32, 4 in float64). Histograms are
    integer counts, so their sum, and the thresholds, do not depend on how the work is split:
    they equal ``kth_smallest_abs`` of the whole.
    """

    scope: Literal["global", "tensor"] = "global"
    kwarg: str = "thresholds"

    def wanted(self, params: Mapping[str, Any]) -> bool:
        return params.get("trim_scope", "tensor") == self.scope

    def start(self, params: Mapping[str, Any], num_experts: int, numel: int,
              dtype: torch.dtype) -> TrimState:
        k = trim_rank(numel, params["density"], params.get("trim_count", "official"))
        if params["density"] >= 1.0 or k <= 0:
            return TrimState(num_experts, None)
        return TrimState(num_experts, [AbsKthSelector(k, dtype) for _ in range(num_experts)])

    def done(self, state: TrimState) -> bool:
        return state.selectors is None or state.selectors[0].done

    def map(self, state: TrimState, task_vectors: Sequence[Tensor]) -> list[Tensor]:
        assert state.selectors is not None
        return [sel.histogram(t) for sel, t in zip(state.selectors, task_vectors, strict=True)]

    def combine(self, partials: Sequence[list[Tensor]]) -> list[Tensor]:
        return [torch.stack(hists).sum(0) for hists in zip(*partials, strict=True)]

    def reduce(self, state: TrimState, partials: Sequence[list[Tensor]]) -> TrimState:
        assert state.selectors is not None
        for i, sel in enumerate(state.selectors):
            for part in partials:
                sel.hist += part[i]
            sel.next_pass()
        return state

    def value(self, state: TrimState) -> list[float]:
        if state.selectors is None:
            return [-math.inf] * state.num_experts
        return [sel.value() for sel in state.selectors]


def trimmed_sum(flats: Sequence[Tensor], thresholds: Sequence[float]) -> Tensor:
    """Σ_i trim(τ_i) over flat task vectors, trim(τ_i) = τ_i where |τ_i| ≥ t_i, else 0
    (TIES's election vote), accumulated in slices of ``CHUNK`` entries."""
    zero = torch.zeros((), dtype=flats[0].dtype, device=flats[0].device)
    total = torch.zeros_like(flats[0])
    for start in range(0, total.numel(), CHUNK):
        acc = total[start:start + CHUNK]
        for f, t in zip(flats, thresholds, strict=True):
            c = f[start:start + CHUNK]
            acc.add_(torch.where(c.abs() >= t, c, zero))
    return total


def sign_balance(total: Tensor) -> int:
    """#{Σ trim > 0} − #{Σ trim < 0}: its sign elects the sign of TIES's zero votes."""
    return int((total > 0).sum()) - int((total < 0).sum())


@dataclass(frozen=True)
class SignMajority:
    """TIES's tie-break over one parameter read in row blocks: ``sign_balance`` of the trimmed
    sum, over the whole tensor (one round; integer counts add up exactly over blocks). Needs
    the thresholds first (``params["thresholds"]``, or none: density 1 keeps every entry)."""

    kwarg: str = "majority"

    def wanted(self, params: Mapping[str, Any]) -> bool:
        return True

    def start(self, params: Mapping[str, Any], num_experts: int, numel: int,
              dtype: torch.dtype) -> tuple[list[float], int | None]:
        thresholds = params.get("thresholds")
        if thresholds is None:
            thresholds = [-math.inf] * num_experts
        return list(thresholds), None

    def done(self, state: tuple[list[float], int | None]) -> bool:
        return state[1] is not None

    def map(self, state: tuple[list[float], int | None], task_vectors: Sequence[Tensor]) -> int:
        return sign_balance(trimmed_sum([t.reshape(-1) for t in task_vectors], state[0]))

    def combine(self, partials: Sequence[int]) -> int:
        return sum(partials)

    def reduce(self, state: tuple[list[float], int | None], partials: Sequence[int]
               ) -> tuple[list[float], int | None]:
        return state[0], sum(partials)

    def value(self, state: tuple[list[float], int | None]) -> int:
        assert state[1] is not None
        return state[1]


@register(
    "ties",
    family="elementwise",
    summary="Trim each τ_i to its top-density magnitudes, elect a sign per entry, "
            "average the agreeing entries, scale.",
    citation="Yadav et al., TIES-Merging, NeurIPS 2023, arXiv 2306.01708 (official code's rules)",
    docs={
        "density": "fraction of each task vector's entries kept by magnitude",
        "aggregate": "mean: divide by the number of kept agreeing entries; sum: add them",
        "scaling": "λ applied after the disjoint aggregate",
        "trim_scope": "tensor: top-k per tensor; global: top-k over the whole model (2 extra passes)",
        "trim_count": "official: keep ⌊density·d⌋ + 1 entries of each τ_i (TIES's code); exact: "
                      "keep ⌊density·d⌋, at least 1 (mergekit 0.1.5); ties at the threshold "
                      "are all kept",
    },
    constraints={"density": Interval(float, 0, 1, closed="right")},
    statistic=TrimThresholds("global"),
    tensor_statistics=(TrimThresholds("tensor"), SignMajority()),
    rowwise=True,
    recorded_if_set=("trim_count",),
    notes="Defaults (density 0.2, mean, λ=1.0) are the SVC paper's TIES setting; the TIES paper "
          "and FusionBench use aggregate=sum with scaling=0.3. trim_count (added later) is "
          "written into the resolved recipe only when it is not official, so earlier records "
          "stay byte-identical.",
)
def ties(task_vectors: Sequence[Tensor], *, density: float = 0.2,
         aggregate: Literal["mean", "sum"] = "mean", scaling: float = 1.0,
         trim_scope: Literal["tensor", "global"] = "tensor", trim_count: TrimCount = "official",
         thresholds: Sequence[float] | None = None, majority: int | None = None) -> Tensor:
    """TIES-Merging as in the official code (Yadav et al., arXiv 2306.01708).

    1. Trim: keep |τ_i| ≥ t_i, t_i the k-th smallest |τ_i|, k = ``trim_rank(d, density,
       trim_count)``: d − ⌊d·density⌋ by the official rule, d − max(1, ⌊d·density⌋) + 1 by
       ``exact`` (mergekit's count). ``thresholds`` overrides t_i (the engine passes
       whole-model thresholds for ``trim_scope: global``, and a row-blocked tensor's).
    2. Elect: s = sign(Σ_i trim(τ_i)); zeros of s take sign(Σ s). ``majority`` overrides Σ s
       (the engine passes the whole tensor's when it merges the parameter in row blocks).
    3. Disjoint aggregate: keep trim(τ_i) where it is > 0 and s > 0, or < 0 and s ≤ 0; then
       sum, or divide by the count of nonzero kept entries (at least 1) for ``mean``.
    4. Multiply by ``scaling``.
    Thresholds come from an exact radix selection (``AbsKthSelector``) and the loops run over
    slices of ``CHUNK`` entries, so beyond the inputs only one float buffer, two byte-sized
    masks and chunk-sized temporaries are alive.
    """
    if thresholds is None:
        if trim_scope == "global":
            raise ValueError("ties with trim_scope=global needs whole-model thresholds; "
                             "run it through specmerge.merge, which computes them")
        if density >= 1.0 or task_vectors[0].numel() == 0:  # nothing to trim
            thresholds = [float("-inf")] * len(task_vectors)
        else:
            k = trim_rank(task_vectors[0].numel(), density, trim_count)
            thresholds = [kth_smallest_abs(t, k) for t in task_vectors]

    shape = task_vectors[0].shape
    flats = [t.reshape(-1) for t in task_vectors]
    zero = torch.zeros((), dtype=flats[0].dtype, device=flats[0].device)
    total = trimmed_sum(flats, thresholds)
    # elected sign > 0; zeros take sign(Σ signs), and a zero majority stays "not > 0"
    positive = total > 0
    if majority is None:
        majority = sign_balance(total)
    if majority > 0:
        positive |= total == 0

    # disjoint aggregate, reusing the sum's buffer; counts fit in uint8 for K < 256
    merged = total.zero_()
    count = torch.zeros(merged.shape, device=merged.device,
                        dtype=torch.uint8 if len(flats) < 256 else torch.int32)
    for start in range(0, merged.numel(), CHUNK):
        acc, cnt, pos = (x[start:start + CHUNK] for x in (merged, count, positive))
        for f, t in zip(flats, thresholds, strict=True):
            c = f[start:start + CHUNK]
            agree = torch.where(pos, c > 0, c < 0) & (c.abs() >= t)
            acc.add_(torch.where(agree, c, zero))
            cnt.add_(agree)
    if aggregate == "mean":
        merged.div_(count.clamp_(min=1))
    merged = merged.reshape(shape)
    return merged.mul_(scaling)


@register(
    "dare",
    family="elementwise",
    summary="Drop each entry of τ_i with probability p, rescale survivors by 1/(1−p), "
            "then task arithmetic.",
    citation="Yu et al., Language models are Super Mario (DARE), ICML 2024, arXiv 2311.03099",
    docs={
        "drop_rate": "p, the probability of dropping each entry of each task vector",
        "scaling": "λ of the task arithmetic applied after drop-and-rescale",
    },
    constraints={"drop_rate": Interval(float, 0, 1, closed="left")},
    uses_weights=True,
    uses_rng=True,
    counter_rng=True,
    rowwise=True,
    propagates_nonfinite=True,
    notes="The masks come from a counter-based generator keyed by (seed, parameter, expert, "
          "element index) (splitmix64, specmerge.methods.rng): they do not depend on the block "
          "size, the device or the workers. Since specmerge 0.x (issue #13) DARE's masks, and so "
          "its bytes, differ from earlier releases' (torch.Generator streams); same "
          "distribution.",
)
def dare(task_vectors: Sequence[Tensor], *, weights: Sequence[float] | None = None,
         generators: Sequence[CounterRNG] | None = None, drop_rate: float = 0.5,
         scaling: float = 0.3) -> Tensor:
    """DARE (arXiv 2311.03099): τ = λ Σ_i w_i (m_i ⊙ τ_i) / (1 − p), m_i ~ Bernoulli(1 − p).

    Element j of m_i is [u_i(j) ≥ p], u_i(j) ∈ [0, 1) the j-th number (flat, row-major) of the
    counter-based stream ``generators[i]`` (``CounterRNG``: a hash of the engine's key for the
    recipe seed, the parameter name and i, and of j). The result does not depend on the device,
    the processing order, the number of workers or the row blocks the engine reads.
    """
    ws = _weights(task_vectors, weights)
    if generators is None:
        generators = [CounterRNG(i) for i in range(len(task_vectors))]
    out = torch.zeros_like(task_vectors[0])
    flat_out = out.reshape(-1)
    for w, tau, gen in zip(ws, task_vectors, generators, strict=True):
        if drop_rate == 0.0:
            out.add_(tau, alpha=w)
            continue
        flat = tau.reshape(-1)
        for lo in range(0, flat.numel(), RNG_CHUNK):
            c = flat[lo:lo + RNG_CHUNK]
            keep = gen.uniform(lo, c.numel(), c.device) >= drop_rate
            flat_out[lo:lo + RNG_CHUNK].add_(c * keep, alpha=w / (1.0 - drop_rate))
    return out.mul_(scaling)


# ---------------------------------------------------------------------------------------------
# mergekit's generalized task arithmetic (GTA), the semantics of its recipes
# ---------------------------------------------------------------------------------------------

def _l1_rescaled(tau: Tensor, kept: Tensor) -> Tensor:
    """``kept`` scaled to τ's L1 norm (mergekit's ``rescale``), unless either is below 1e-7."""
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def sparsify(tau: Tensor, density: float, method: str, *, gamma: float = 0.01,
             rescale: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """mergekit 0.1.5's sparsifications of one task vector (``mergekit/sparsify.py``):

    - magnitude: keep the k = max(1, ⌊density·n⌋) largest |τ| (density ≤ 0 keeps none);
    - magnitude_outliers (Model Breadcrumbs, arXiv 2312.06795): drop the ⌊gamma·n⌋ largest,
      then keep the next ⌊density·n⌋ (fewer outliers dropped when the count demands it);
    - random (DARE): keep each entry with probability density, from ``generator``.
    density ≥ 1 returns τ. ``rescale`` scales the kept entries back to τ's L1 norm.
    """
    if density >= 1 or method == "none":
        return tau
    n = tau.numel()
    flat = tau.reshape(-1)
    if method == "random":
        keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density
        kept = tau * keep.to(tau.device)
    else:
        if density <= 0 or n == 0:
            return torch.zeros_like(tau)
        order = torch.argsort(flat.abs().float(), descending=method == "magnitude")
        if method == "magnitude":
            idx = order[:max(1, int(density * n))]
        else:
            target = int(density * n)
            low = max(0, n - target - int(gamma * n))
            idx = order[low:low + target]
        mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
        mask[idx] = True
        kept = torch.where(mask, flat, torch.zeros((), dtype=tau.dtype,
                                                   device=tau.device)).reshape(tau.shape)
    return _l1_rescaled(tau, kept) if rescale else kept


@register(
    "gta",
    family="elementwise",
    summary="mergekit's generalized task arithmetic: sparsify each τ_i at its own density, "
            "weight, optionally elect signs, sum, optionally normalise, scale.",
    citation="Goddard et al., Arcee's MergeKit, arXiv 2403.13257 (generalized task arithmetic "
             "as in mergekit 0.1.5)",
    docs={
        "sparsification": "none, magnitude (TIES), random (DARE) or magnitude_outliers "
                          "(Model Breadcrumbs)",
        "consensus": "none, or the sign election: sum (TIES: sign of Σ w_i τ_i) or count "
                     "(majority of signs)",
        "normalize": "divide by Σ w_i over the kept (and agreeing) entries",
        "rescale": "scale each sparsified τ_i back to its L1 norm",
        "gamma": "share of the largest |τ| dropped by magnitude_outliers",
        "scaling": "λ applied to the merged update (mergekit's lambda)",
    },
    constraints={"gamma": Interval(float, 0, 1)},
    uses_weights=True,
    uses_densities=True,
    uses_rng=True,
    notes="Used for recipes in mergekit's format: linear, task_arithmetic, ties, dare_ties, "
          "dare_linear, breadcrumbs and breadcrumbs_ties map onto it. DARE's masks come from "
          "specmerge's per-parameter seeds, so they differ from mergekit's (same distribution).",
)
def gta(task_vectors: Sequence[Tensor], *, weights: Sequence[float] | None = None,
        densities: Sequence[float] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        sparsification: Literal["none", "magnitude", "random", "magnitude_outliers"] = "none",
        consensus: Literal["none", "sum", "count"] = "none", normalize: bool = False,
        rescale: bool = False, gamma: float = 0.01, scaling: float = 1.0) -> Tensor:
    """Generalized task arithmetic, as mergekit 0.1.5 computes it (arXiv 2403.13257):

        δ_i = w_i · sparsify(τ_i, d_i)
        with consensus: s = sign(Σ δ_i) (sum; ≥ 0 counts as +) or sign(Σ sign δ_i) (count),
                        m_i = [sign δ_i = s],  τ = Σ m_i δ_i,  D = Σ m_i w_i (0 → 1)
        without:        τ = Σ δ_i,  D = Σ w_i (|D| < 1e-8 → 1)
        τ ← τ / D if normalize;  τ ← λ τ.

    ``densities`` are the models' d_i (default 1); ``generators`` drive the random sparsification.
    """
    ws = _weights(task_vectors, weights)
    ds = [1.0] * len(task_vectors) if densities is None else [float(d) for d in densities]
    gens: Sequence[torch.Generator | None] = (
        list(generators) if generators is not None else [None] * len(task_vectors))
    deltas = [sparsify(t, d, sparsification, gamma=gamma, rescale=rescale, generator=g).mul(w)
              for t, d, g, w in zip(task_vectors, ds, gens, ws, strict=True)]
    if consensus == "none":
        merged = weighted_sum(deltas)
        divisor = torch.full_like(merged, sum(ws))
        divisor[divisor.abs() < 1e-8] = 1
    else:
        votes = weighted_sum(deltas if consensus == "sum" else [d.sign() for d in deltas])
        elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
        merged = torch.zeros_like(deltas[0])
        divisor = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, ws, strict=True):
            agree = d.sign() == elected
            merged.add_(torch.where(agree, d, 0.0))
            divisor.add_(agree.to(divisor.dtype), alpha=w)
        divisor[divisor == 0] = 1
    if normalize:
        merged.div_(divisor)
    return merged.mul_(scaling)
