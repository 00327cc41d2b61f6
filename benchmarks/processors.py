"""Time entcal's sampling ops against transformers' warpers on the same logits.

For each method, batch size (1, 32, 256) and vocabulary (49152: SmolLM2-135M, 262144: Gemma 3
270M), both implementations process the same float32 logits tensor: real next-token logits of
the embedded models over the embedded corpus (``--synthetic`` uses Zipf-like random rows
instead and needs no model). Reported: median milliseconds per call, the ratio transformers /
entcal (fastest of several runs of each), whether the kept sets are identical, and each method's cost as a share of a SmolLM2
decode step at batch 32 (measured here too, with a KV cache and 128 tokens of context).

    python benchmarks/processors.py                     # JSON + Markdown in benchmarks/results/
    python benchmarks/processors.py --quick             # batch 32, vocab 49152 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from entcal.decoding import parse
from entcal.decoding.reference import reference_warpers

NEG = float("-inf")

# name -> entcal spec; the transformers reference is its warper where transformers has one
METHODS = {
    "temperature": "temperature=0.7",
    "top_k": "top_k=50",
    "top_p": "top_p=0.95",
    "min_p": "min_p=0.05",
    "typical": "typical=0.9",
    "epsilon": "epsilon=0.0003",
    "eta": "eta=0.0009",
    "top_n_sigma": "top_n_sigma=1.0",
    "mirostat": "mirostat:tau=3.0",
    "edt": "edt:theta=1.0",
    "top_h": "top_h=0.4",
    "smoothing": "smoothing_factor=0.3",
    "dynatemp": "temperature=0.9,dynatemp_range=0.4",
    "xtc": "xtc:threshold=0.1,probability=1",
    "mirostat_v1": "mirostat:version=1,tau=3.0",
    "dry": "dry:multiplier=0.8",  # over a context of DRY_CONTEXT tokens
}
#: Context length DRY is timed with (token ids with many repeats: its worst case).
DRY_CONTEXT = 512


def transformers_warper(spec: str):
    """transformers' warper for a one-key chain spec (``entcal.decoding.reference``), or None
    where transformers has none (``top_n_sigma``, named methods, ...)."""
    try:
        (warper,) = reference_warpers(spec)
    except ValueError:
        return None
    return warper


def real_logits(model_name: str, rows: int) -> torch.Tensor:
    """``rows`` next-token logits rows of an embedded model over the embedded corpus."""
    from entcal import corpora, models

    model, tok = models.load(model_name)
    docs = corpora.load_corpus().documents
    seqs, i = [], 0
    while sum(len(s) - 16 for s in seqs) < rows and i < len(docs):
        ids = tok(docs[i])["input_ids"][:144]
        if len(ids) >= 64:
            seqs.append(ids)
        i += 1
    out = []
    with torch.inference_mode():
        for ids in seqs:
            lg = model(torch.tensor([ids])).logits[0, 16:].float()
            out.append(lg)
    del model
    return torch.cat(out)[:rows].contiguous()


def synthetic_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = 0.8 + 0.8 * torch.rand(rows, 1, generator=g)
    u = torch.rand(rows, vocab, generator=g).clamp_(min=1e-9)
    return (-s * torch.log(u * vocab) + 0.5 * torch.randn(rows, vocab, generator=g)).contiguous()


def timeit(fn, budget_s: float, max_reps: int = 7) -> float:
    """Fastest of several runs, in ms (the minimum is the estimate least disturbed by other
    processes on a shared machine; at least 2 runs after a warm-up)."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000.0


def decode_step_ms(batch: int = 32, context: int = 128, steps: int = 5) -> float:
    """Fastest of ``steps`` SmolLM2-135M decode steps (KV cache) at ``batch`` x ``context``."""
    from entcal import models

    model, _ = models.load("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, context), generator=g)
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - t0)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return min(times) * 1000.0


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [32] if args.quick else [1, 32, 256]
    vocabs = [49152] if args.quick else [49152, 262144]
    sources = {}
    for v in vocabs:
        if args.synthetic:
            sources[v] = (synthetic_logits(max(batches), v), "synthetic Zipf-like rows")
        else:
            name = "smollm2-135m" if v == 49152 else "gemma3-270m"
            print(f"# logits of {name} ...", file=sys.stderr)
            sources[v] = (real_logits(name, max(batches)), f"{name} on the pydoc corpus")
    step = None if args.no_decode_step else decode_step_ms()
    results = []
    with torch.inference_mode():
        for v in vocabs:
            logits, source = sources[v]
            for b in batches:
                x = logits[:b].contiguous()
                budget = args.budget * (4 if b * v <= 32 * 49152 else 1)
                for name, spec in METHODS.items():
                    dec = parse(spec)
                    ids = None
                    if name == "dry":
                        ids = torch.randint(0, 8, (b, DRY_CONTEXT))
                    ours_ms = timeit(lambda d=dec, x=x, i=ids: d(x, i), budget)
                    row = {"method": name, "spec": spec, "batch": b, "vocab": v,
                           "source": source, "entcal_ms": round(ours_ms, 3)}  # fmt: skip
                    ref = transformers_warper(spec)
                    if ref is not None:
                        ref_ms = timeit(lambda r=ref, x=x: r(None, x), budget)
                        same = (ref(None, x) == NEG) == (dec(x) == NEG)
                        row.update(
                            transformers_ms=round(ref_ms, 3),
                            ratio=round(ref_ms / ours_ms, 2),
                            identical_mask=bool(same.all()),
                            rows_differing=int((~same).any(-1).sum()),
                        )
                    if step is not None and b == 32 and v == 49152:
                        row["share_of_decode_step"] = round(ours_ms / step, 4)
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr)
    return {
        "benchmark": "entcal.decoding ops vs transformers warpers",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "decode_step_ms_smollm2_batch32": None if step is None else round(step, 2),
        "results": results,
    }


def markdown(report: dict) -> str:
    lines = [
        "# entcal sampling ops vs transformers' warpers",
        "",
        f"Machine: {report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']}, "
        f"{report['machine']['torch_threads']} threads, load average at the end "
        f"{report['machine']['load_average']}.",
    ]
    step = report["decode_step_ms_smollm2_batch32"]
    if step:
        lines.append(f"SmolLM2-135M decode step at batch 32 (KV cache, 128 tokens): {step} ms.")
    lines += [
        "",
        "| method | vocab | batch | transformers ms | entcal ms | ratio | identical mask | % of decode step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        share = r.get("share_of_decode_step")
        ident = r.get("identical_mask")
        if ident is False:
            ident_s = f"no ({r['rows_differing']} rows)"
        else:
            ident_s = {True: "yes", None: "–"}[ident]
        lines.append(
            f"| {r['method']} | {r['vocab']} | {r['batch']} | {r.get('transformers_ms', '–')} | "
            f"{r['entcal_ms']} | {r.get('ratio', '–')} | {ident_s} | "
            f"{'' if share is None else f'{100 * share:.1f}%'} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--quick", action="store_true", help="batch 32, vocab 49152 only")
    p.add_argument("--synthetic", action="store_true", help="Zipf-like random rows, no model")
    p.add_argument("--budget", type=float, default=1.0, help="seconds per timing (roughly)")
    p.add_argument("--no-decode-step", action="store_true", help="skip the decode-step timing")
    p.add_argument("--name", default="processors", help="output file stem")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
