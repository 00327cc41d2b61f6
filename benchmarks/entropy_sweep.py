"""Time entcal's truncation ops against transformers' warpers across the entropy range.

Real next-token logits are peaked; flat rows (high temperature, the first tokens of a base
model, any uncertain position) are where sort-free shortcuts lose their edge. Rows here are
Gaussian logits times a scale chosen (by bisection on the batch's mean entropy) so that the mean
entropy is 0.5, 1, 2, 4, 6, 8 or 10 nats, plus the real logits of SmolLM2-135M (vocab 49152) and
Gemma 3 270M (262144) on the embedded corpus. For each regime, batch (1, 32, 256) and
vocabulary: the floor (one ``torch.softmax`` over the same tensor), entcal and transformers
(fastest of several runs each, same process, same tensor), their ratio, entcal's cost in
softmax passes, and whether the kept sets are identical.

    python benchmarks/entropy_sweep.py --threads 2        # JSON + Markdown in benchmarks/results/
    python benchmarks/entropy_sweep.py --quick            # vocab 49152, batch 32 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processors import real_logits, timeit, transformers_warper

from entcal.decoding import parse

NEG = float("-inf")
ENTROPIES = (0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0)
#: method -> entcal spec, each with a transformers warper (entcal.decoding.reference); the
#: issue's targets concern the first four.
METHODS = {
    "top_p": "top_p=0.95",
    "typical": "typical=0.9",
    "eta": "eta=0.0009",
    "top_h": "top_h=0.4",
    "temperature": "temperature=0.7",
    "top_k": "top_k=50",
    "min_p": "min_p=0.05",
    "epsilon": "epsilon=0.0003",
}
TARGETS = ("top_p", "typical", "eta", "top_h")


def mean_entropy(x: torch.Tensor) -> float:
    logp = torch.log_softmax(x, -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def gaussian_rows(rows: int, vocab: int, entropy: float, seed: int = 0) -> torch.Tensor:
    """Gaussian logits ``[rows, vocab]`` scaled so that their mean entropy is ``entropy``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g)
    lo, hi = 0.0, 100.0  # entropy falls as the scale grows
    for _ in range(40):
        mid = (lo + hi) / 2
        if mean_entropy(z * mid) > entropy:
            lo = mid
        else:
            hi = mid
    return (z * ((lo + hi) / 2)).contiguous()


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [32] if args.quick else [1, 32, 256]
    vocabs = [49152] if args.quick else [49152, 262144]
    results = []
    with torch.inference_mode():
        for v in vocabs:
            regimes: dict[str, torch.Tensor] = {}
            for h in ENTROPIES:
                regimes[f"H={h:g}"] = gaussian_rows(max(batches), v, h)
            name = "smollm2-135m" if v == 49152 else "gemma3-270m"
            if not args.no_real:
                print(f"# logits of {name} ...", file=sys.stderr)
                regimes[f"real {name}"] = real_logits(name, max(batches))
            for regime, logits in regimes.items():
                for b in batches:
                    x = logits[:b].contiguous()
                    budget = args.budget
                    floor = timeit(lambda x=x: torch.softmax(x, -1), budget)
                    for method, spec in METHODS.items():
                        if args.methods and method not in args.methods.split(","):
                            continue
                        dec, ref = parse(spec), transformers_warper(spec)
                        ours = timeit(lambda d=dec, x=x: d(x), budget)
                        theirs = timeit(lambda r=ref, x=x: r(None, x), budget)
                        ref_rm, ours_rm = ref(None, x) == NEG, dec(x) == NEG
                        same = ref_rm == ours_rm
                        # entcal keeps a tied boundary group whole (the documented tie rule):
                        # differences at transformers' weakest kept logit are ties, not errors
                        weakest = torch.where(ref_rm, torch.inf, x).amin(-1, keepdim=True)
                        beyond_ties = ~same & (x != weakest)
                        row = {
                            "method": method, "regime": regime, "vocab": v, "batch": b,
                            "mean_entropy": round(mean_entropy(x), 2),
                            "softmax_ms": round(floor, 3), "entcal_ms": round(ours, 3),
                            "transformers_ms": round(theirs, 3),
                            "ratio": round(theirs / ours, 2),
                            "softmax_passes": round(ours / floor, 1),
                            "identical_mask": bool(same.all()),
                            "rows_differing": int((~same).any(-1).sum()),
                            "rows_differing_beyond_ties": int(beyond_ties.any(-1).sum()),
                        }  # fmt: skip
                        results.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    return {
        "benchmark": "entcal truncation ops vs transformers warpers across the entropy range",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "goal": "top_p, typical, eta, top_h >= 5x transformers everywhere (>= 10x on real logits "
        "at batch 32); no method slower than transformers; each <= 6 softmax passes",
        "results": results,
    }


def worst(report: dict) -> dict:
    """The worst cells against each part of the goal."""
    res = report["results"]
    targets = [r for r in res if r["method"] in TARGETS]
    return {
        "lowest_ratio_target_methods": min(targets, key=lambda r: r["ratio"]),
        "lowest_ratio_any_method": min(res, key=lambda r: r["ratio"]),
        "most_softmax_passes": max(res, key=lambda r: r["softmax_passes"]),
        "cells_slower_than_transformers": sum(r["ratio"] < 1 for r in res),
        "target_cells_below_5x": sum(r["ratio"] < 5 for r in targets),
        "cells_above_6_softmax_passes": sum(r["softmax_passes"] > 6 for r in res),
        "cells_differing_beyond_ties": sum(r.get("rows_differing_beyond_ties", 0) > 0 for r in res),
        "cells": len(res),
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    w = report["worst"]
    lines = [
        "# Truncation ops across the entropy range: entcal vs transformers",
        "",
        f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} threads, "
        f"load average at the end {m['load_average']}. Goal: {report['goal']}.",
        "",
        f"Cells: {w['cells']}; slower than transformers: {w['cells_slower_than_transformers']}; "
        f"target methods below 5x: {w['target_cells_below_5x']}; above 6 softmax passes: "
        f"{w['cells_above_6_softmax_passes']}; kept sets differing from transformers' beyond "
        f"the tie rule: {w['cells_differing_beyond_ties']}.",
    ]
    for key in ("lowest_ratio_target_methods", "lowest_ratio_any_method", "most_softmax_passes"):
        r = w[key]
        lines.append(
            f"- {key.replace('_', ' ')}: {r['method']} at {r['regime']}, vocab {r['vocab']}, "
            f"batch {r['batch']}: {r['entcal_ms']} ms vs {r['transformers_ms']} ms "
            f"({r['ratio']}x, {r['softmax_passes']} softmax passes)"
        )
    lines += [
        "",
        "| method | regime | vocab | batch | H | softmax ms | entcal ms | transformers ms | ratio "
        "| softmax passes | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["identical_mask"]:
            ident = "yes"
        elif r.get("rows_differing_beyond_ties", 1) == 0:
            ident = f"ties only ({r['rows_differing']} rows)"
        else:
            ident = f"no ({r['rows_differing']} rows)"
        lines.append(
            f"| {r['method']} | {r['regime']} | {r['vocab']} | {r['batch']} | "
            f"{r['mean_entropy']} | {r['softmax_ms']} | {r['entcal_ms']} | "
            f"{r['transformers_ms']} | {r['ratio']} | {r['softmax_passes']} | {ident} |"
        )
    lines.append("")
    return "\n".join(lines)


def _run_order(r: dict) -> tuple:
    """A row's place in a full run: vocab, then regime (Gaussian by entropy, then real), batch,
    method."""
    regime = r["regime"]
    level = float(regime[2:]) if regime.startswith("H=") else float("inf")
    return r["vocab"], level, r["batch"], list(METHODS).index(r["method"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--quick", action="store_true", help="vocab 49152, batch 32 only")
    p.add_argument("--no-real", action="store_true", help="Gaussian rows only (no model)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per timing (roughly)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--name", default="entropy_sweep", help="output file stem")
    p.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    p.add_argument(
        "--merge", action="store_true", help="replace these methods' rows in the existing JSON"
    )
    args = p.parse_args()
    report = run(args)
    old = Path(args.out) / f"{args.name}.json"
    if args.merge and old.exists():
        redone = {r["method"] for r in report["results"]}
        kept = [r for r in json.loads(old.read_text())["results"] if r["method"] not in redone]
        report["results"] = sorted(kept + report["results"], key=_run_order)
    report["worst"] = worst(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
