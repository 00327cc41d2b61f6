"""``entcal frontier``: the calibration–log-loss frontier of decoder families.

Cao, Valiant & Liang (arXiv 2511.11966, §4.3, Fig. 3) show the trade-off of temperature: lowering
τ lowers the entropy of generations (less miscalibration) and raises the log loss of human text
(less diversity). Each decoder family traces such a curve; a better calibrator reaches EntCE = 0
at a lower log-loss cost. On the same prompts, seeds and documents, this sweeps

* ``temperature``: ``temperature=τ``;
* ``calibrated``: ``calibrated:scale=s`` (the fitted α, base and strengths, times ``s``; ``s = 1`` is the
  shipped decoder, ``s = 0`` the raw model);
* ``lookahead``: ``lookahead:alpha=α`` (one-step lookahead future entropy, Braverman et al. 2020);
* ``top_p``: ``top_p=p``, a reference: truncation gives human text an infinite log loss, so its
  points are placed at an infinite cost (their EntCE on the tokens they keep is reported too);

plus ``ancestral`` (cost 0), runs them through :func:`entcal.eval.compare.run_compare` (cached
per decoder: adding points computes only those) and writes

* ``frontier.json``: per point ``family``, ``value``, ``spec``, ``entce``, ``entce_se``,
  ``human_log_loss``, ``log_loss_cost`` (human log loss minus the raw model's on the same tokens,
  nats/token), ``entropy_slope`` (nats/token per 100 steps) and its standard error;
* ``frontier.png``: EntCE against log-loss cost with ±1 SE bars, one line per family;
* ``frontier.md``: the points as a table, with the generation entropy by quarter of the text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "family_spec", "frontier_points", "run_frontier"]

#: spec of each family's point at a value
FAMILIES = {
    "temperature": lambda v: f"temperature={v:g}",
    "calibrated": lambda v: "calibrated" if v == 1 else f"calibrated:scale={v:g}",
    "lookahead": lambda v: f"lookahead:alpha={v:g}",
    "top_p": lambda v: f"top_p={v:g}",
}

#: the sweep ``entcal frontier`` runs unless told otherwise
DEFAULT_FAMILIES: dict[str, tuple[float, ...]] = {
    "temperature": (0.97, 0.94, 0.92, 0.9),
    "calibrated": (0.5, 1.0, 1.5),
    "top_p": (0.95, 0.9),
}


def family_spec(family: str, value: float, predictor: str | None = None) -> str:
    """The decoder spec of ``family`` at ``value`` (``ValueError`` for an unknown family);
    ``predictor``: the calibrated family's predictor folder (default: the shipped one)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    if family == "calibrated" and predictor is not None:
        return f"calibrated:predictor={predictor}" + ("" if value == 1 else f",scale={value:g}")
    return FAMILIES[family](value)


def frontier_points(
    results: Mapping[str, Any],
    sweep: Mapping[str, Sequence[float]],
    predictor: str | None = None,
) -> list[dict[str, Any]]:
    """The frontier points of a compare ``results`` dict (see the module docstring).

    ``results["decoders"]`` must hold ``ancestral`` and every spec of ``sweep``.
    """
    from entcal.decoding import parse

    decs = results["decoders"]
    raw_loss = _num(results["human"]["log_loss"])
    entries = [("ancestral", 0.0, "ancestral")]
    for family, values in sweep.items():
        entries += [
            (family, float(v), str(parse(family_spec(family, v, predictor)))) for v in values
        ]
    points = []
    for family, value, spec in entries:
        d = decs[spec]
        loss = _num(d["human_log_loss"])
        points.append(
            {
                "family": family,
                "value": value,
                "spec": spec,
                "entce": _num(d["entce"]),
                "entce_se": _num(d["entce_se"]),
                "entce_on_kept_tokens": _num(d["entce_included"]),
                "human_log_loss": loss,
                "log_loss_cost": loss - raw_loss,
                "human_tokens_excluded": _num(d["human_tokens_excluded"]),
                "entropy_slope": 100 * _num(d["entropy_slope"]),
                "entropy_slope_se": 100 * _num(d["entropy_slope_se"]),
                "gen_entropy": _num(d["gen_entropy"]),
            }
        )
    return points


def markdown(doc: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    """The frontier as a markdown table (``doc``: frontier.json's content; ``results``: the
    compare results it came from, for the entropy by quarter)."""
    lines = [
        f"# Frontier: {doc['model']} on {doc['corpus']}",
        "",
        f"{doc['n']} prompts × {doc['samples']} samples × {doc['length']} tokens, seed "
        f"{doc['seed']}; raw model's human log loss {doc['raw_human_log_loss']:.4f} nats/token. "
        "EntCE = generation entropy − human log loss (± text-clustered SE); cost = human log loss "
        "− the raw model's; slope in nats/token per 100 steps.",
        "",
        "| family | spec | EntCE | log-loss cost | slope /100 steps | entropy by quarter |",
        "|---|---|---|---|---|---|",
    ]
    for raw in doc["points"]:
        p = {k: v if k in ("family", "spec") else _num(v) for k, v in raw.items()}
        curve = [_num(v) for v in results["decoders"][p["spec"]]["gen_entropy_per_step"]]
        q = max(1, len(curve) // 4)
        quarters = ", ".join(
            f"{sum(curve[i : i + q]) / len(curve[i : i + q]):.2f}" for i in range(0, q * 4, q)
        )
        if math.isfinite(p["log_loss_cost"]):
            entce = f"{p['entce']:+.3f} ± {p['entce_se']:.3f}"
            cost = f"{p['log_loss_cost']:+.4f}"
        else:
            excl = p["human_tokens_excluded"]
            entce = f"−∞ ({p['entce_on_kept_tokens']:+.3f} on kept tokens)"
            cost = f"∞ ({excl:.2%} of human tokens excluded)"
        slope = f"{p['entropy_slope']:+.3f} ± {p['entropy_slope_se']:.3f}"
        lines.append(f"| {p['family']} | `{p['spec']}` | {entce} | {cost} | {slope} | {quarters} |")
    return "\n".join(lines) + "\n"


def _num(v: Any) -> float:
    if isinstance(v, str):
        return float(v)  # "inf", "-inf", "nan" in strict results JSON
    return math.nan if v is None else float(v)


def plot_frontier(points: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """EntCE against log-loss cost, one line per family, ±1 SE bars; infinite costs at the right
    edge (labelled ∞) with their EntCE on the kept tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [p["log_loss_cost"] for p in points if math.isfinite(p["log_loss_cost"])]
    right = max([*finite, 0.01]) * 1.15
    fig, ax = plt.subplots(figsize=(7, 5))
    families: dict[str, list[dict]] = {}
    for p in points:
        families.setdefault(p["family"], []).append(p)
    origin = families.get("ancestral", [None])[0]
    for family, pts in families.items():
        inf = not all(math.isfinite(p["log_loss_cost"]) for p in pts)
        if origin is not None and family != "ancestral" and not inf:
            pts = [origin, *pts]  # every family starts at the raw model (τ = 1, scale 0, α 0)
        xs = [right if inf else p["log_loss_cost"] for p in pts]
        ys = [p["entce_on_kept_tokens"] if inf else p["entce"] for p in pts]
        err = [0 if inf or not math.isfinite(p["entce_se"]) else p["entce_se"] for p in pts]
        order = sorted(range(len(pts)), key=lambda i: xs[i])
        label = family + (" (cost ∞; EntCE on kept tokens)" if inf else "")
        ax.errorbar(
            [xs[i] for i in order], [ys[i] for i in order], yerr=[err[i] for i in order],
            marker="x" if inf else "o", capsize=3, ls="none" if inf else "-", label=label,
        )  # fmt: skip
        for i in order:
            if pts[i] is origin and family != "ancestral":
                continue
            ax.annotate(f"{pts[i]['value']:g}", (xs[i], ys[i]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("human log-loss cost (nats/token, vs the raw model)")
    ax.set_ylabel("EntCE = generation entropy − human log loss (nats/token)")
    ax.set_title(title or "Calibration–log-loss frontier")
    ticks = [t for t in ax.get_xticks() if 0 <= t < right * 0.9]
    ax.set_xticks([*ticks, right], [*(f"{t:g}" for t in ticks), "∞"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_frontier(
    config,
    sweep: Mapping[str, Sequence[float]] = DEFAULT_FAMILIES,
    *,
    predictor: str | None = None,
    model=None,
    tokenizer=None,
    pairs=None,
) -> dict[str, Any]:
    """Run the sweep with the settings of ``config`` (a
    :class:`~entcal.eval.compare.CompareConfig`, whose ``decoders`` are ignored) and write
    ``OUT/frontier.json``, ``OUT/frontier.png`` and the compare outputs in ``OUT/compare/``.
    ``predictor``: the calibrated family's predictor folder (default: the model's shipped one);
    ``model``, ``tokenizer``, ``pairs``: as for :func:`~entcal.eval.compare.run_compare`.

    Raises ``ValueError`` for an unknown family or a value its decoder rejects (and
    ``PredictorFileError`` for a predictor that is unreadable) before any model work; a
    predictor made for another model fails once the model is loaded, before any generation.
    """
    from entcal.eval.compare import parse_decoders, run_compare

    specs = ["ancestral"] + [family_spec(f, v, predictor) for f, vs in sweep.items() for v in vs]
    parsed = list(parse_decoders(specs).values())  # bad values fail here, before model work
    out = Path(config.out)
    compare_config = dataclasses.replace(config, out=out / "compare", decoders=parsed, plots=False)
    results = run_compare(compare_config, model=model, tokenizer=tokenizer, pairs=pairs)
    points = frontier_points(results, sweep, predictor)
    doc = {
        "model": results["model"],
        "corpus": results["corpus"],
        "split": results.get("split"),
        "n": results["n"],
        "samples": results.get("samples", 1),
        "length": results["length"],
        "seed": results["seed"],
        "raw_human_log_loss": _num(results["human"]["log_loss"]),
        "points": points,
    }
    out.mkdir(parents=True, exist_ok=True)
    from entcal.eval.results_cache import to_json

    (out / "frontier.json").write_text(json.dumps(to_json(doc), indent=1, allow_nan=False))
    (out / "frontier.md").write_text(markdown(doc, results))
    title = (
        f"{results['model']} on {results['corpus']} ({results['n']} prompts × "
        f"{results.get('samples', 1)} samples × {results['length']} tokens)"
    )
    plot_frontier(points, out / "frontier.png", title)
    return doc
