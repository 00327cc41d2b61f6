"""The branching study's report: ``results.json``, ``report.md`` and two plots (``listdecode``).

Takes the :class:`entcal.studies.branching.BranchingResult` of each threshold and writes the
measured erroneous-list size against β̂(1 − R̂ᵗ)/(1 − R̂) per step, R̂ with its bootstrap
interval per θ, and a Markdown table of both; it computes nothing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from entcal.studies.branching import BranchingResult

__all__ = ["write_branching_report"]


def write_branching_report(results: Sequence[BranchingResult], meta: dict, out) -> list:
    """Write ``results.json``, ``report.md`` and two PNG plots into ``out``; return the paths."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "thetas": [r.to_dict() for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=True))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(results), 1)))
    for r, c in zip(results, colors):
        t = np.arange(1, r.steps + 1)
        ax.plot(t, r.erroneous_mean, "o-", color=c, ms=3, label=f"θ={r.theta:g} (R̂={r.R:.2f})")
        ax.plot(t, r.erroneous_predicted, "--", color=c, lw=1)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("step t")
    ax.set_ylabel("erroneous candidates per prompt")
    ax.set_title(f"{meta.get('model', '')}: measured (dots), β̂(1−R̂ᵗ)/(1−R̂) (dashed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p1 = out / "erroneous_vs_step.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    th = np.array([r.theta for r in results])
    R = np.array([r.R for r in results])
    lo = np.array([r.R_low for r in results])
    hi = np.array([r.R_high for r in results])
    ax.errorbar(th, R, yerr=[np.maximum(R - lo, 0), np.maximum(hi - R, 0)], fmt="o-", capsize=3)
    ax.axhline(1.0, color="gray", ls=":")
    if meta.get("critical_theta"):
        ax.axvline(meta["critical_theta"], color="red", ls="--", lw=1, label="R = 1")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("threshold θ")
    ax.set_ylabel("R̂ (kept children per erroneous candidate)")
    ax.set_title(f"{meta.get('model', '')}: branching factor, 95% bootstrap interval")
    fig.tight_layout()
    p2 = out / "R_vs_theta.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)

    lines = [
        f"# List decoding branching analysis: {meta.get('model', '')}",
        "",
        "Chang (arXiv 2303.13112): erroneous candidates of a threshold list decoder form a "
        "branching process; E[E_t] = β(1 − Rᵗ)/(1 − R), bounded iff R < 1.",
        "",
        f"{meta.get('n_prompts')} prompts of {meta.get('prompt_tokens')} tokens from "
        f"`{meta.get('human')}`, {meta.get('steps')} steps, cap {meta.get('max_list')} "
        f"erroneous candidates per prompt (uniform subset, Horvitz–Thompson weights), seed "
        f"{meta.get('seed')}, {meta.get('seconds')} s.",
        "",
        "| θ | R̂ | 95% interval | SE | β̂ | ref. token kept | erroneous at last step "
        "(measured / predicted) | cap hit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.theta:g} | {r.R:.3f} | [{r.R_low:.3f}, {r.R_high:.3f}] | {r.R_se:.3f} | "
            f"{r.beta:.3f} | {r.ref_kept_rate:.2f} | {r.erroneous_mean[-1]:.2f} / "
            f"{r.erroneous_predicted[-1]:.2f} | {r.cap_hit_rate:.2f} |"
        )
    crit = meta.get("critical_theta")
    lines += [
        "",
        "R̂ crosses 1 at θ ≈ " + (f"{crit:.3g}" if crit else "— (not within the sweep)") + ".",
        "",
        f"![erroneous vs step]({p1.name})",
        "",
        f"![R vs theta]({p2.name})",
        "",
    ]
    p3 = out / "report.md"
    p3.write_text("\n".join(lines))
    return [out / "results.json", p3, p1, p2]
