"""Scoring throughput: entcal's batched scorer vs the naive reference, same process, same texts.

``entcal.eval.scoring.score`` (prompt once, output embedding applied per bounded window,
statistics vectorised) against the obvious reference: one full forward per batch keeping
``[B, L, V]`` logits, then ``log_softmax`` / entropy / varentropy / rank over all of them. Both
score the same ``--batch`` texts of ``--prompt-tokens`` + ``--length`` tokens under the raw
model (and, with ``--decoder``, under one decoder too). The two are alternated ``--repeats``
times (the machine may be shared) and the medians are reported (wall and CPU seconds), with the
reference's peak logits bytes vs the scorer's budget. Tokens/s counts continuation tokens scored.

    .venv/bin/python benchmarks/scoring.py --out benchmarks/results/scoring.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _reference(model, prompts, conts, decoder=None):
    ids = torch.cat([prompts, conts], dim=1)
    p = prompts.shape[1]
    with torch.inference_mode():
        logits = model(ids).logits[:, p - 1 : -1].float()
        dists = [logits] + ([decoder(logits.reshape(-1, logits.shape[-1]))] if decoder else [])
        out = []
        for lg in dists:
            lg = lg.reshape(-1, logits.shape[-1])
            lp = torch.log_softmax(lg, -1)
            pr = lp.exp()
            lp0 = torch.where(pr > 0, lp, 0.0)
            h = -(pr * lp0).sum(-1)
            v = (pr * (lp0 + h[:, None]) ** 2).sum(-1)
            tgt = conts.reshape(-1, 1)
            out.append((lp.gather(-1, tgt), h, v))
        chosen = logits.reshape(-1, logits.shape[-1]).gather(-1, conts.reshape(-1, 1))
        rank = (logits.reshape(-1, logits.shape[-1]) > chosen).sum(-1) + 1
    return out, rank, logits.numel() * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--decoder", default="top_p=0.95", help="'' for raw only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/scoring.json")
    args = ap.parse_args()

    from entcal import corpora, models
    from entcal.decoding import parse
    from entcal.eval.scoring import DEFAULT_MEMORY_BUDGET, score

    model, tok = models.load(args.model)
    pairs = corpora.make_pairs(
        corpora.load_corpus(), tok, prompt_tokens=args.prompt_tokens,
        continuation_tokens=args.length, n=args.batch, seed=0,
    )  # fmt: skip
    prompts = torch.tensor([p.prompt_ids for p in pairs])
    conts = torch.tensor([p.continuation_ids for p in pairs])
    dec = parse(args.decoder) if args.decoder else None
    decoders = {"d": dec} if dec else {}
    ours, ref, ours_cpu, ref_cpu = [], [], [], []
    peak_ref = 0
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        res = score(model, prompts.tolist(), conts.tolist(), decoders, batch_size=8)
        ours.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        (raw, *_), _rank, peak_ref = _reference(model, prompts, conts, dec)
        ref.append(time.perf_counter() - t)
        ref_cpu.append(time.process_time() - c)
    # The two agree (a benchmark of wrong numbers is worthless).
    diff = float((res.raw.logprob.reshape(-1) - raw[0].reshape(-1)).abs().max())
    tokens = conts.numel()
    t_ours, t_ref = statistics.median(ours), statistics.median(ref)
    out = {
        "model": args.model,
        "texts": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "continuation_tokens": args.length,
        "decoder": args.decoder or None,
        "threads": torch.get_num_threads(),
        "entcal_seconds": t_ours,
        "reference_seconds": t_ref,
        "entcal_tokens_per_s": tokens / t_ours,
        "reference_tokens_per_s": tokens / t_ref,
        "speed_ratio_entcal_over_reference": t_ref / t_ours,
        # CPU seconds (all threads): what a shared machine cannot distort much.
        "entcal_tokens_per_cpu_s": tokens / statistics.median(ours_cpu),
        "reference_tokens_per_cpu_s": tokens / statistics.median(ref_cpu),
        "reference_logits_bytes": peak_ref,
        "entcal_memory_budget_bytes": DEFAULT_MEMORY_BUDGET,
        "max_abs_logprob_diff": diff,
        "all_entcal_seconds": ours,
        "all_reference_seconds": ref,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
