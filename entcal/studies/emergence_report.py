"""The information-emergence report: ``results.json``, ``report.md`` and plots (``emergence``).

Takes an :class:`entcal.studies.emergence.EmergenceResult` and writes IE and its MI terms per
block (and IE per position when measured) with their standard errors, as plots and a Markdown
table; it computes nothing itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from entcal.studies.emergence import EmergenceResult

__all__ = ["write_emergence_report"]


def write_emergence_report(result: EmergenceResult, meta: dict, out) -> list:
    """Write ``results.json``, ``report.md`` and PNG plots into ``out``; return the paths."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, **result.to_dict()}
    (out / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=True))
    paths = [out / "results.json"]

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    ax1.errorbar(result.layers, result.ie, yerr=result.ie_se, fmt="o-", color="C3", capsize=2)
    ax1.axhline(0.0, color="gray", ls=":")
    ax1.set_ylabel("IE(l) (nats, ± 1 SE)")
    ax1.set_title(f"{result.model}: information emergence per block")
    ax2.errorbar(
        result.layers,
        result.mi_macro,
        yerr=result.mi_macro_se,
        fmt="o-",
        capsize=2,
        label="MI macro (last token, in context)",
    )
    ax2.errorbar(
        result.layers,
        result.mi_micro,
        yerr=result.mi_micro_se,
        fmt="s-",
        capsize=2,
        label="mean MI micro (token alone)",
    )
    ax2.set_xlabel("block l")
    ax2.set_ylabel("MI(h_{l+1}; h_l) (nats)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    p = out / "ie_per_layer.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    if result.ie_positions:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(result.layers)))
        for layer, row, c in zip(result.layers, result.ie_positions, colors):
            ax.plot(range(result.seq_len), row, "-", color=c, lw=1, label=f"block {layer}")
        ax.set_xlabel("position t")
        ax.set_ylabel("IE(l, t) (nats)")
        ax.set_title(f"{result.model}: IE vs position")
        if len(result.layers) <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "ie_per_position.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

    lines = [
        f"# Information emergence: {result.model}",
        "",
        "Chen et al. (arXiv 2405.12617): IE(l) = MI(h_{l+1}^macro; h_l^macro) − mean_t "
        "MI(h_{l+1}^micro_t; h_l^micro_t). Macro: the last token's state in the full sequence; "
        "micro: token t fed alone. MI: held-out Donsker–Varadhan bound of a MINE critic "
        "(selected on validation windows, evaluated on test windows), ± one standard error over "
        "the test windows (training-seed spread not included).",
        "",
        f"{result.n_sequences} distinct windows of {result.seq_len} tokens from "
        f"`{meta.get('human', 'pydoc')}` ({result.n_test} test windows); each state reduced to "
        f"{result.dim} whitened principal components plus N(0, {result.noise}²) noise per "
        f"component; BOS prepended: {result.bos}; seed {result.seed}; MINE settings "
        f"{result.mine}; {meta.get('seconds')} s. Values depend on these settings: compare only "
        "at equal settings.",
        "",
        "| block | IE (nats) | MI macro | MI micro (mean over t) |",
        "|---|---|---|---|",
    ]
    for i, layer in enumerate(result.layers):
        lines.append(
            f"| {layer} | {result.ie[i]:+.3f} ± {result.ie_se[i]:.3f} "
            f"| {result.mi_macro[i]:.3f} ± {result.mi_macro_se[i]:.3f} "
            f"| {result.mi_micro[i]:.3f} ± {result.mi_micro_se[i]:.3f} |"
        )
    lines += [""] + [f"![{q.stem}]({q.name})" for q in paths[1:]] + [""]
    p = out / "report.md"
    p.write_text("\n".join(lines))
    paths.insert(1, p)
    return paths
