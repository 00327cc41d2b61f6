"""``report.md`` and the PNG plots of ``entcal compare`` (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from entcal.eval import detect

__all__ = ["markdown", "summary_table", "write_plots"]


def _num(v: Any) -> float:
    if isinstance(v, str):
        return float(v)  # "inf", "-inf", "nan"
    return math.nan if v is None else float(v)


def _fmt(v: Any, digits: int = 3) -> str:
    x = _num(v)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}f}"


def summary_table(results: dict) -> str:
    """The main table (markdown): one row per decoder, plus the human reference row."""
    head = (
        "| decoder | gen entropy | human log loss | excluded | EntCE | slope /100 steps | "
        "mean abs(l−h) | KS p | typical | AUROC typicality | AUROC log-lik | distinct-2 | "
        "self-BLEU | Zipf | rep-4 |"
    )
    sep = "|" + "---|" * 15
    rows = [head, sep]
    hum = results["human"]
    hd = hum["diversity"]
    rows.append(
        f"| human (raw model) | {_fmt(hum['raw_entropy'])} | {_fmt(hum['log_loss'])} | – | – | – | "
        f"{_fmt(hum['aep']['mean_abs_gap'])} | {_fmt(hum['aep']['z_ks_pvalue'])} | "
        f"{_fmt(hum['aep']['typical_fraction'], 2)} | – | – | {_fmt(hd['distinct_2'])} | "
        f"{_fmt(hd['self_bleu'])} | {_fmt(hd['zipf'])} | {_fmt(hd['repetition'])} |"
    )
    for spec, d in results["decoders"].items():
        excl = _num(d["human_tokens_excluded"])
        loss = _fmt(d["human_log_loss"])
        if excl > 0:
            loss += f" ({_fmt(d['human_log_loss_included'])} on kept)"
        det = d["detect"]
        div = d["diversity"]
        slope = _num(d["entropy_slope"]) * 100
        rows.append(
            f"| `{spec}` | {_fmt(d['gen_entropy'])} | {loss} | {excl * 100:.2f}% | "
            f"{_fmt(d['entce'])} ± {_fmt(d['entce_se'])} | {_fmt(slope)} | "
            f"{_fmt(d['aep']['mean_abs_gap'])} | {_fmt(d['aep']['z_ks_pvalue'])} | "
            f"{_fmt(d['aep']['typical_fraction'], 2)} | "
            f"{_fmt(det.get('typicality', {}).get('auroc'))} | "
            f"{_fmt(det.get('log_likelihood', {}).get('auroc'))} | "
            f"{_fmt(div['distinct_2'])} | {_fmt(div['self_bleu'])} | {_fmt(div['zipf'])} | "
            f"{_fmt(div['repetition'])} |"
        )
    return "\n".join(rows)


def markdown(results: dict, plots: list[str]) -> str:
    """The full ``report.md``."""
    lines = [
        "# entcal compare",
        "",
        f"Model `{results['model']}`, corpus `{results['corpus']}`, {results['n']} prompts of "
        f"{results['prompt_tokens']} tokens, "
        + (
            f"{results['samples']} continuations per prompt "
            if results.get("samples", 1) > 1
            else ""
        )
        + f"of {results['length']} tokens, seed {results['seed']}. Nats per token throughout.",
        "",
        summary_table(results),
        "",
        "* **gen entropy**: mean exact entropy of the distribution each decoder sampled from, over "
        "its generations; **human log loss**: teacher-forced −log p̃ of the human continuation "
        "under that same distribution (∞ when the decoder excludes a human token; **excluded** is "
        "the fraction it excludes). **EntCE** = gen entropy − human log loss ± standard error "
        "(Cao, Valiant & Liang); **slope**: rise of the generation entropy per 100 steps.",
        "* **AEP** (Mudumbai & Bell) under the sampling distribution: mean |l − h| per text, "
        "KS p-value of z = √N(l − h)/√V̄ against N(0, 1), fraction of texts with |l − h| ≤ "
        f"{_fmt(results['epsilon'], 2)}.",
        "* **AUROC** human vs generated with the raw model as scorer (higher score = machine).",
        "",
        "## Truncated samples scored by the raw model",
        "",
        "| decoder | mean l−h (sampled dist.) | mean l−h (raw model) | KS p (raw model) |",
        "|---|---|---|---|",
    ]
    for spec, d in results["decoders"].items():
        lines.append(
            f"| `{spec}` | {_fmt(d['aep']['mean_gap'])} | {_fmt(d['aep_raw']['mean_gap'])} | "
            f"{_fmt(d['aep_raw']['z_ks_pvalue'])} |"
        )
    lines += ["", "## Detectors (AUROC / TPR at 1% FPR)", ""]
    names = sorted({k for d in results["decoders"].values() for k in d["detect"]})
    lines.append("| decoder | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for spec, d in results["decoders"].items():
        cells = []
        for k in names:
            e = d["detect"].get(k)
            cells.append("–" if e is None else f"{_fmt(e['auroc'])} / {_fmt(e['tpr_at_1fpr'], 2)}")
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## Samples (first 80 tokens of the first generation)", ""]
    for spec, d in results["decoders"].items():
        sample = str(d.get("sample", "")).replace("\n", " ")
        lines.append(f"* `{spec}`: {sample}")
    lines.append("")
    return "\n".join(lines)


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc if i else v
        out[i] = acc
    return out


def write_plots(results: dict, scores: dict, out: Path) -> list[str]:
    """Write the four PNG plots into ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    names = []
    decs = results["decoders"]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # 1. entropy per step, with the human log-loss line (smoothed like the paper, α = 0.2 / 0.1).
    fig, ax = plt.subplots(figsize=(8, 5))
    human = np.array([_num(v) for v in results["human"]["log_loss_per_step"]])
    ax.plot(_ema(human, 0.1), color="black", lw=2, label="human log loss (raw model)")
    for i, (spec, d) in enumerate(decs.items()):
        c = colors[i % len(colors)]
        ent = np.array([_num(v) for v in d["gen_entropy_per_step"]])
        ax.plot(_ema(ent, 0.2), color=c, label=f"{spec}: generation entropy")
        loss = np.array([_num(v) for v in d["human_log_loss_per_step"]])
        if np.isfinite(loss).all() and spec != "ancestral":
            ax.plot(_ema(loss, 0.1), color=c, ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("Generation entropy per step vs human log loss (dotted: under each decoder)")
    ax.legend(fontsize=7)
    save(fig, "entropy_per_step.png")

    # 2. AEP convergence: mean |l - h| against N, with the sqrt(V/N) envelope.
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (spec, d) in enumerate(decs.items()):
        c = colors[i % len(colors)]
        cur = d["aep"]["curve"]
        ax.loglog(cur["n"], [_num(v) for v in cur["mean_abs_gap"]], color=c, marker="o", ms=3,
                  label=f"{spec} (sampled dist.)")  # fmt: skip
        ax.loglog(cur["n"], [_num(v) for v in cur["envelope"]], color=c, ls=":", lw=1)
        raw = d["aep_raw"]["curve"]
        ax.loglog(raw["n"], [_num(v) for v in raw["mean_abs_gap"]], color=c, ls="--", lw=1)
    hc = results["human"]["aep"]["curve"]
    ax.loglog(hc["n"], [_num(v) for v in hc["mean_abs_gap"]], color="black", lw=2,
              label="human (raw model)")  # fmt: skip
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("mean |l − h|")
    ax.set_title("AEP: solid sampled dist., dashed raw model, dotted √(V̄/N)")
    ax.legend(fontsize=7)
    save(fig, "aep.png")

    # 3. ROC curves per detector.
    hs = scores["human"]
    human_det = detect.detector_scores(
        hs.raw.logprob, hs.raw.entropy, hs.raw.varentropy, hs.mask, hs.raw.rank,
        hs.observer_cross_entropy,
    )  # fmt: skip
    dets = list(human_det)
    fig, axes = plt.subplots(1, len(dets), figsize=(3.2 * len(dets), 3.4), squeeze=False)
    for j, name in enumerate(dets):
        ax = axes[0, j]
        for i, spec in enumerate(decs):
            gs = scores[spec]
            g = detect.detector_scores(
                gs.raw.logprob, gs.raw.entropy, gs.raw.varentropy, gs.mask, gs.raw.rank,
                gs.observer_cross_entropy,
            )  # fmt: skip
            fpr, tpr = detect.roc(human_det[name], g[name])
            ax.plot(fpr, tpr, color=colors[i % len(colors)], label=spec)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("FPR")
        if j == 0:
            ax.set_ylabel("TPR")
    axes[0, -1].legend(fontsize=6)
    save(fig, "roc.png")

    # 4. Calibration vs log loss: EntCE against human log loss (kept tokens when truncating).
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, (spec, d) in enumerate(decs.items()):
        c = colors[i % len(colors)]
        excl = _num(d["human_tokens_excluded"])
        x = _num(d["human_log_loss"]) if excl == 0 else _num(d["human_log_loss_included"])
        y = _num(d["entce"]) if excl == 0 else _num(d["entce_included"])
        ax.scatter([x], [y], color=c, marker="o" if excl == 0 else "x", s=50)
        label = spec if excl == 0 else f"{spec} (log loss ∞: {excl:.1%} excluded)"
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(_num(results["human"]["log_loss"]), color="black", lw=0.8, ls="--")
    ax.set_xlabel("human log loss (x: on the kept tokens only)")
    ax.set_ylabel("EntCE = entropy − log loss")
    ax.set_title("Calibration vs log loss")
    save(fig, "calibration_vs_logloss.png")
    return names
