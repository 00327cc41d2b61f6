"""Branching analysis of threshold list decoding: β, R and the phase transition at R = 1.

Chang ("A Simple Explanation for the Phase Transition in Large Language Models with List
Decoding", arXiv 2303.13112) models the erroneous candidates of a list decoder as a branching
process. Against a reference continuation (human text), a candidate is *erroneous* once it leaves
the reference. Per step, the correct prefix spawns β erroneous children on average (kept tokens
other than the reference token) and every erroneous candidate keeps R children on average (all
erroneous). With E₀ = 0 the expected number of erroneous candidates after t steps is

    E[E_t] = β (1 − Rᵗ) / (1 − R)        (β t when R = 1),

bounded by β/(1 − R) when R < 1 and growing like Rᵗ when R > 1: R plays the role of the basic
reproduction number R₀.

Measurement (one batched engine shared with :class:`entcal.studies.list_decoder.ListDecoder`):

* the correct prefix is always extended by the reference token (teacher forcing), so β is
  measured at every step; ``ref_kept_rate`` says how often the reference token itself passed θ;
* erroneous candidates are extended by every token with p ≥ θ; their count per group is capped at
  ``max_list`` by a *uniform* random subset whose survivors carry Horvitz–Thompson weights
  (count before the cap / count kept), so the weighted count estimates the uncapped E_t;
* R̂ = Σ wᵢ cᵢ / Σ wᵢ over all erroneous parents i with cᵢ kept children: Harris' maximum-likelihood
  estimator of a Galton–Watson offspring mean (all weights 1 while the cap does not bind);
* β̂ = mean number of erroneous children of the correct prefix per step;
* intervals: a cluster bootstrap over prompts (percentile 95%), and a cluster-robust (delta
  method) standard error, since the candidates of one prompt are not independent.

The estimators and the formula above are in :mod:`entcal.studies.branching_stats`; the report
in :mod:`entcal.studies.branching_report`.

Known answer: :class:`entcal.synthetic.BranchingSourceLM` is a synthetic "language model" whose
erroneous prefixes keep exactly Binomial(n, R/n) tokens above θ, so R is set exactly; it runs
through the same code.

Example::

    >>> from entcal import corpora, models
    >>> from entcal.studies.branching import branching_sweep
    >>> from entcal.studies.branching_stats import critical_theta
    >>> model, tok = models.load("smollm2-135m")
    >>> pairs = corpora.make_pairs(corpora.load_corpus(), tok, prompt_tokens=32,
    ...                            continuation_tokens=8, n=2)
    >>> results = branching_sweep(model, pairs, thetas=[0.05, 0.4], steps=4)
    >>> [(r.theta, round(r.R, 2)) for r in results]   # R > 1: lists grow; R < 1: they die out
    [(0.05, 3.54), (0.4, 0.33)]
    >>> round(critical_theta(results), 2)             # θ where R crosses 1 (interpolated)
    0.26
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from entcal.studies.branching_stats import predicted_erroneous, ratio_stats
from entcal.studies.list_decoder import _Rows, model_device
from entcal.studies.list_rules import cap_per_group, check_list_params, select_children

__all__ = ["BranchingResult", "branching_analysis", "branching_sweep"]


@dataclasses.dataclass
class BranchingResult:
    """Branching statistics of one threshold (all counts per prompt, averaged over prompts).

    Attributes:
        theta: per-step threshold; ``min_total_logprob`` the total bound (or None).
        R, R_se, R_low, R_high: Harris estimate of the offspring mean of erroneous candidates,
            its cluster-robust standard error and a 95% cluster-bootstrap interval.
        beta, beta_se: erroneous children of the correct prefix per step, and standard error.
        erroneous_mean: measured mean (weighted) erroneous count after t = 1..steps steps.
        erroneous_predicted: β̂(1 − R̂ᵗ)/(1 − R̂) at the same t.
        list_size_mean: mean number of erroneous candidates actually kept (after the cap).
        ref_kept_rate: fraction of steps where the reference token itself had p ≥ θ.
        n_parents: erroneous candidates whose children were counted (unweighted).
        cap_hit_rate: fraction of (prompt, step) where the cap bound.
    """

    theta: float | None
    min_total_logprob: float | None
    steps: int
    n_prompts: int
    max_list: int
    R: float
    R_se: float
    R_low: float
    R_high: float
    beta: float
    beta_se: float
    erroneous_mean: list[float]
    erroneous_predicted: list[float]
    list_size_mean: list[float]
    ref_kept_rate: float
    n_parents: int
    cap_hit_rate: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pairs_ids(pairs) -> tuple[list[list[int]], list[list[int]]]:
    prompts, refs = [], []
    for p in pairs:
        if hasattr(p, "prompt_ids"):
            prompt, ref = p.prompt_ids, p.continuation_ids
        else:
            prompt, ref = p
        prompts.append([int(t) for t in prompt])
        refs.append([int(t) for t in ref])
    if not prompts:
        raise ValueError("pairs is empty: give at least one (prompt, reference) pair")
    return prompts, refs


def _check_common(steps, refs, max_list, n_boot):
    shortest = min(len(r) for r in refs)
    if steps is None:
        steps = shortest
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > shortest:
        raise ValueError(
            f"steps={steps} exceeds the shortest reference continuation ({shortest} tokens)"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    return steps


def _run_one(
    rows: _Rows,
    ref: torch.Tensor,
    *,
    theta: float,
    min_total_logprob: float | None,
    steps: int,
    max_list: int,
    n_boot: int,
    seed: int,
    progress=None,
) -> BranchingResult:
    device = ref.device
    G = ref.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = math.floor(1.0 / theta + 1e-9)
    group = torch.arange(G, device=device)
    is_ref = torch.ones(G, dtype=torch.bool, device=device)
    weight = torch.ones(G, device=device)
    total = torch.zeros(G, device=device)
    logprobs = rows.first_logprobs
    A = torch.zeros(G, dtype=torch.float64, device=device)  # Σ w c over erroneous parents
    B = torch.zeros(G, dtype=torch.float64, device=device)  # Σ w over erroneous parents
    beta_sum = torch.zeros(G, dtype=torch.float64, device=device)
    ref_kept = torch.zeros(G, dtype=torch.float64, device=device)
    err_count = torch.zeros((steps, G), dtype=torch.float64, device=device)
    kept_size = torch.zeros((steps, G), dtype=torch.float64, device=device)
    cap_hits = 0
    n_parents = 0
    for t in range(steps):
        counts, parent, token, tok_lp = select_children(
            logprobs, total, theta=theta, min_total_logprob=min_total_logprob, k=k
        )
        ref_tok = ref[:, t]
        # Correct prefix: kept tokens other than the reference token are its erroneous children.
        ref_rows = is_ref.nonzero().flatten()
        lp_ref = logprobs[ref_rows, ref_tok[group[ref_rows]]]
        ref_pass = lp_ref >= math.log(theta)
        if min_total_logprob is not None:
            ref_pass &= total[ref_rows] + lp_ref >= min_total_logprob
        ref_kept.index_add_(0, group[ref_rows], ref_pass.double())
        beta_sum.index_add_(0, group[ref_rows], (counts[ref_rows] - ref_pass.long()).double())
        err_rows = (~is_ref).nonzero().flatten()
        n_parents += int(err_rows.numel())
        A.index_add_(0, group[err_rows], (weight[err_rows] * counts[err_rows]).double())
        B.index_add_(0, group[err_rows], weight[err_rows].double())
        # Erroneous children: everything kept except the reference row's reference token.
        wrong = ~(is_ref[parent] & (token == ref_tok[group[parent]]))
        parent, token, tok_lp = parent[wrong], token[wrong], tok_lp[wrong]
        c_group = group[parent]
        c_weight = weight[parent]
        err_count[t].index_add_(0, c_group, c_weight.double())
        # Cap: a uniform random subset per prompt, reweighted by (count before / count kept).
        n_before = torch.bincount(c_group, minlength=G)
        key = torch.rand(parent.shape[0], generator=gen).to(device)
        keep = cap_per_group(c_group, key, max_list)
        parent, token, tok_lp = parent[keep], token[keep], tok_lp[keep]
        c_group, c_weight = c_group[keep], c_weight[keep]
        n_after = torch.bincount(c_group, minlength=G)
        cap_hits += int((n_before > n_after).sum())
        scale = n_before.double() / n_after.clamp_min(1).double()
        c_weight = (c_weight.double() * scale[c_group]).float()
        kept_size[t] = n_after.double()
        if progress is not None:
            progress.update(1)
        if t == steps - 1:
            break
        # Next rows: each correct prefix followed by its reference token, then the children.
        ref_parent = ref_rows
        ref_next = ref_tok[group[ref_rows]]
        index = torch.cat([ref_parent, parent])
        rows.gather(index)
        next_tokens = torch.cat([ref_next, token])
        total = torch.cat(
            [total[ref_parent] + logprobs[ref_parent, ref_next], total[parent] + tok_lp]
        )
        group = torch.cat([group[ref_parent], c_group])
        is_ref = torch.cat(
            [
                torch.ones_like(ref_parent, dtype=torch.bool),
                torch.zeros_like(parent, dtype=torch.bool),
            ]
        )
        weight = torch.cat([torch.ones_like(ref_parent, dtype=torch.float), c_weight])
        logprobs = rows.step(next_tokens)
    rng = np.random.default_rng(seed)
    A_np, B_np = A.cpu().numpy(), B.cpu().numpy()
    R, R_se, R_low, R_high = ratio_stats(A_np, B_np, n_boot, rng)
    per_prompt_beta = beta_sum.cpu().numpy() / steps
    beta = float(per_prompt_beta.mean())
    beta_se = float(per_prompt_beta.std(ddof=1) / math.sqrt(G)) if G > 1 else float("nan")
    return BranchingResult(
        theta=theta,
        min_total_logprob=min_total_logprob,
        steps=steps,
        n_prompts=G,
        max_list=max_list,
        R=R,
        R_se=R_se,
        R_low=R_low,
        R_high=R_high,
        beta=beta,
        beta_se=beta_se,
        erroneous_mean=err_count.mean(1).cpu().tolist(),
        erroneous_predicted=predicted_erroneous(beta, R, steps),
        list_size_mean=kept_size.mean(1).cpu().tolist(),
        ref_kept_rate=float(ref_kept.sum().item() / (G * steps)),
        n_parents=n_parents,
        cap_hit_rate=cap_hits / (G * steps),
    )


@torch.inference_mode()
def branching_sweep(
    model,
    pairs,
    thetas: Sequence[float],
    *,
    steps: int | None = None,
    max_list: int = 32,
    min_total_logprob: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    pad_token_id: int = 0,
    progress: bool = False,
) -> list[BranchingResult]:
    """:func:`branching_analysis` for several thresholds, sharing one prefill of the prompts.

    Args:
        model: a causal LM (:func:`entcal.models.load`) or
            :class:`entcal.synthetic.BranchingSourceLM`.
        pairs: :class:`entcal.corpora.TextPair` objects or ``(prompt_ids, reference_ids)``.
        thetas: per-step thresholds, each in (0, 1).
        steps: decoding steps (default: the shortest reference).
        max_list: cap on the erroneous candidates kept per prompt (≥ 1).
        min_total_logprob: optional extra bound on a candidate's total log-probability.
        n_boot: bootstrap resamples for the interval.
        seed: seeds the random cap and the bootstrap.
        progress: show a tqdm bar (one tick per step and threshold).
    """
    thetas = list(thetas)
    if not thetas:
        raise ValueError("thetas is empty: give at least one threshold in (0, 1)")
    for th in thetas:
        if th is None:
            raise ValueError("branching analysis needs a per-step theta in (0, 1), got None")
        check_list_params(th, min_total_logprob, max_list)
    prompts, refs = _pairs_ids(pairs)
    steps = _check_common(steps, refs, max_list, n_boot)
    device = model_device(model)
    ref = torch.tensor([r[:steps] for r in refs], dtype=torch.long, device=device)
    base = _Rows(model, prompts, pad_token_id)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(thetas), desc="entcal listdecode", unit="step")
    try:
        results = []
        for i, th in enumerate(thetas):
            rows = base.clone() if i < len(thetas) - 1 else base
            if bar is not None:
                bar.set_postfix_str(f"theta={th:g}")
            results.append(
                _run_one(
                    rows,
                    ref,
                    theta=float(th),
                    min_total_logprob=min_total_logprob,
                    steps=steps,
                    max_list=max_list,
                    n_boot=n_boot,
                    seed=seed,
                    progress=bar,
                )
            )
            del rows
    finally:
        if bar is not None:
            bar.close()
    return results


def branching_analysis(
    model,
    pairs,
    theta: float,
    *,
    steps: int | None = None,
    max_list: int = 32,
    min_total_logprob: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    pad_token_id: int = 0,
    progress: bool = False,
) -> BranchingResult:
    """β̂, R̂ (with intervals) and the erroneous-list size per step for one threshold θ.

    See the module docstring for the estimators; the arguments are those of
    :func:`branching_sweep`.
    """
    return branching_sweep(
        model,
        pairs,
        [theta],
        steps=steps,
        max_list=max_list,
        min_total_logprob=min_total_logprob,
        n_boot=n_boot,
        seed=seed,
        pad_token_id=pad_token_id,
        progress=progress,
    )[0]
