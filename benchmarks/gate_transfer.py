"""Where the calibrated decoder's gate opens, on the training domain and on a corpus it never saw.

For each corpus (the pydoc test split and a ``.txt`` of your choice, e.g. Jane Austen from
``benchmarks/corpora/janeausten.py``) this computes the predicted excess future entropy rate
``D̂_t`` of the shipped SmolLM2 predictor along three kinds of text from the same prompts: the
human continuation, an ancestral generation and a ``calibrated`` generation (each 256 tokens,
seed 0). ``D̂_t`` is what the decoder's state tracker computes at step ``t`` (features of the raw
distributions, so teacher forcing the raw model on the generated tokens gives the decoder's own
values). Reported per position bucket: the share of steps where the gate is open (``D̂_t > c``),
the mean ``D̂_t`` and the mean ``α_t``; plus the raw entropy of the generations. JSON out, and
optionally the ``D̂`` arrays as a ``.pt`` file for further analysis.

    python benchmarks/corpora/janeausten.py --out runs/austen.txt
    python benchmarks/gate_transfer.py --other runs/austen.txt --arrays runs/gate-dhat.pt \
        --spec calibrated:warmup=0     # as committed, at commit 2ce4e6f (the gate since changed)

About 12 minutes on 2 CPU threads (41 + 48 prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from entcal import corpora, models
from entcal.calibrators.derailment import (
    early_level_along,
    gate_alpha,
    lifted_excess_along,
    step_strength,
)
from entcal.calibrators.state import sequence_features, step_stats
from entcal.decoding import parse
from entcal.generation import generate

QUARTERS = ((0, 64), (64, 128), (128, 192), (192, 256))


def excess_along(model, pred, prompts, continuations, batch: int = 8) -> torch.Tensor:
    """``D̂ (N, T)`` along continuations, as the decoder's state tracker computes it."""
    proj = pred.projection_on(torch.device("cpu"))
    ids = torch.tensor([list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)])
    start = len(prompts[0])
    out = []
    for s in range(0, len(ids), batch):
        logits = model(ids[s : s + batch]).logits[:, start - 1 : -1].float()
        lp = torch.log_softmax(logits, -1)
        n, t, v = lp.shape
        st = step_stats(lp.reshape(n * t, v), proj)
        feats = sequence_features(st.entropy.view(n, t), st.z.view(n, t, -1))
        out.append(pred.predict_tensor(feats))
    return torch.cat(out)


def gate_summary(
    d: torch.Tensor, strength, threshold, base, edges, warmup: int, lift=(0.0, 0.0)
) -> dict:
    """Per position bucket: the share of steps whose score (``D̂``, lifted by ``lift = (λ, ℓ)``)
    exceeds ``c`` (whatever the warm-up), the mean ``D̂``, and the mean and largest ``α`` (the
    gate closed during the warm-up)."""
    mean_d = d
    d = lifted_excess_along(d, warmup, *lift)
    steps = torch.arange(d.shape[1])
    bucket = torch.bucketize(steps, torch.tensor(edges), right=True)
    g = step_strength(torch.tensor(strength), steps, torch.tensor(edges), warmup).expand_as(d)
    alpha = gate_alpha(d, g, torch.tensor(threshold), torch.tensor(base))
    res: dict = {"open_fraction": [], "mean_dhat": [], "mean_alpha": [], "max_alpha": []}
    for b in range(len(strength)):
        sel = bucket == b
        res["open_fraction"].append(round(float((d[:, sel] > threshold).float().mean()), 4))
        res["mean_dhat"].append(round(float(mean_d[:, sel].mean()), 3))
        res["mean_alpha"].append(round(float(alpha[:, sel].mean()), 4))
        res["max_alpha"].append(round(float(alpha[:, sel].max()), 3))
    res["open_all"] = round(float((d > threshold).float().mean()), 4)
    return res


def separation(arrays: dict, level: float | None = None, late: int = 64) -> dict:
    """How well a score separates ancestral states from human states at steps >= ``late``:
    AUROC, and the shares flagged at the threshold that flags 2% of pydoc's human states, for
    ``D̂`` itself, for ``D̂`` minus its own mean over early steps of the same text (steps 8-23),
    and for ``D̂`` lifted by ``λ`` times the text's shortfall below the human level ``ℓ`` over
    those steps (the decoder's ``lift`` with warm-up 8; ``ℓ`` the gate's own if it has one, else
    the mean of pydoc's human texts here)."""
    from sklearn.metrics import roc_auc_score

    if level is None:
        level = float(early_level_along(arrays[("pydoc", "human")], 8)[:, 23].mean())
    scores = {
        "dhat": lambda d: d,
        "dhat minus its mean over steps 8-23": lambda d: d - early_level_along(d, 8)[:, 23:24],
    }
    for lift in (0.5, 1.0):
        scores[f"dhat lifted: lift={lift:g}, level={level:.3f}"] = lambda d, w=lift: (
            lifted_excess_along(d, 8, w, level)
        )
    out = {}
    for name, score in scores.items():
        thr = float(torch.quantile(score(arrays[("pydoc", "human")])[:, late:].flatten(), 0.98))
        entry: dict = {"threshold_flagging_2pct_of_pydoc_human": round(thr, 3)}
        for corpus in ("pydoc", "other"):
            h = score(arrays[(corpus, "human")])[:, late:].flatten()
            r = score(arrays[(corpus, "ancestral")])[:, late:].flatten()
            labels = torch.cat([torch.zeros(len(h)), torch.ones(len(r))])
            entry[corpus] = {
                "auroc": round(float(roc_auc_score(labels, torch.cat([h, r]))), 3),
                "human_flagged": round(float((h > thr).float().mean()), 3),
                "ancestral_flagged": round(float((r > thr).float().mean()), 3),
            }
        out[name] = entry
    return out


def human_openings(arrays: dict, gate: dict) -> dict:
    """The steps at which the gate's score exceeded its threshold on human text, per corpus
    (counts by step range)."""
    out = {}
    for corpus in ("pydoc", "other"):
        lift = gate.get("lift", (0.0, 0.0))
        score = lifted_excess_along(arrays[(corpus, "human")], gate["warmup"], *lift)
        steps = (score > gate["threshold"]).nonzero()[:, 1]
        out[corpus] = {"total": len(steps), "steps 0-7": int((steps < 8).sum()),
                       "steps 8-63": int(((steps >= 8) & (steps < 64)).sum())}  # fmt: skip
    return out


def shipped_gate(spec: str):
    """SmolLM2, its tokenizer, the predictor of ``spec`` and its gate: ``(model, tokenizer,
    predictor, strength, threshold, base, bucket edges, warm-up, (λ, ℓ))``."""
    model, tok = models.load("smollm2-135m")
    dec = parse(spec).bind(model)
    pred = dec.predictor_for(model.config.vocab_size)
    strength, threshold, base = dec.gate()
    gate = pred.gate_["bucket_edges"], dec.warmup_steps(), dec.lift_weights()
    return model, tok, pred, strength, threshold, base, *gate


@torch.inference_mode()
def run(args: argparse.Namespace) -> tuple[dict, dict]:
    torch.set_num_threads(args.threads)
    model, tok, pred, strength, threshold, base, edges, warmup, lift = shipped_gate(args.spec)
    report: dict = {
        "benchmark": "where the shipped SmolLM2 gate opens: human text vs generations",
        "torch_threads": torch.get_num_threads(),
        "spec": args.spec,
        "gate": {"threshold": threshold, "strength": strength, "base": base, "bucket_edges": edges,
                 "warmup": warmup, "lift": list(lift),
                 "reference_level": pred.gate_.get("reference_level")},
    }  # fmt: skip
    arrays: dict = {}
    for name, source, n in (("pydoc", None, args.n_pydoc), ("other", args.other, args.n_other)):
        corpus = corpora.load_corpus(source).split("test")
        pairs = corpora.make_pairs(corpus, tok, prompt_tokens=128, continuation_tokens=256, n=n)
        prompts = [p.prompt_ids for p in pairs]
        entry: dict = {"corpus": corpus.name, "prompts": len(pairs)}
        texts = {"human": [p.continuation_ids for p in pairs]}
        for spec in ("ancestral", args.spec):
            t0 = time.time()
            gens = generate(model, tok, [list(p) for p in prompts], decoder=spec,
                            max_new_tokens=256, seed=0)  # fmt: skip
            kind = "ancestral" if spec == "ancestral" else "calibrated"
            texts[kind] = [g.token_ids for g in gens]
            raw = torch.stack([g.raw_entropy for g in gens])
            arrays[(name, kind, "raw_entropy")] = raw
            entry[f"{kind}_raw_entropy_by_quarter"] = [
                round(float(raw[:, s:e].mean()), 3) for s, e in QUARTERS
            ]
            print(f"{name} {spec}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        for kind, conts in texts.items():
            d = excess_along(model, pred, prompts, conts)
            arrays[(name, kind)] = d
            entry[kind] = gate_summary(d, strength, threshold, base, edges, warmup, lift)
        report[name] = entry
        print(json.dumps(entry), file=sys.stderr, flush=True)
    return report, arrays


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--other", required=True, help="a .txt corpus the predictor never saw")
    p.add_argument("--spec", default="calibrated", help="the calibrated decoder (default: shipped)")
    p.add_argument("--n-pydoc", type=int, default=41, help="pydoc test prompts (default 41)")
    p.add_argument("--n-other", type=int, default=48, help="prompts of the other corpus")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--arrays", default="", help="also save the D̂ arrays here (.pt)")
    p.add_argument(
        "--from-arrays", default="", help="no generation: recompute the separation of a saved run"
    )
    args = p.parse_args()
    out = Path(args.out)
    if args.from_arrays:
        report = json.loads((out / "gate_transfer.json").read_text())
        arrays = torch.load(args.from_arrays, weights_only=True)
    else:
        report, arrays = run(args)
    report["human_openings"] = human_openings(arrays, report["gate"])
    report["separation_after_step_64"] = separation(arrays, report["gate"].get("reference_level"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate_transfer.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.arrays and not args.from_arrays:
        torch.save(arrays, args.arrays)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
