"""Wall time of ``entcal compare`` with ``--engine vllm`` vs ``--engine transformers``.

Both runs use the same model, prompts, seed, length and decoder set (the defaults unless told
otherwise), each in its own fresh output folder (no cache) and its own process, one after the
other (never at once: they would share the cores). Each run's ``results.json`` gives the total
and the phases: generation (the engine under test) and the teacher-forced scoring pass, which
is the same work for both engines. Reported: seconds per run and phase, and
``speedup = transformers / vllm`` for the whole command and for the generation phase alone.

vLLM's start-up (engine, KV cache, workers) is inside its generation phase: it is part of what
a user waits for.

Usage::

    python benchmarks/compare_engines.py [--n 32] [--length 128] [--threads 2] \\
        [--out benchmarks/results/compare_engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("transformers", "vllm")


def run_engine(engine: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / engine
    cmd = [
        sys.executable,
        "-c",
        "import sys; from entcal.cli import main; sys.exit(main(sys.argv[1:]))",
        "compare",
        "--engine",
        engine,
        "--n",
        str(args.n),
        "--length",
        str(args.length),
        "--split",
        args.split,
        "--seed",
        str(args.seed),
        "--out",
        str(out),
        "--no-progress",
    ]
    if args.decoders:
        cmd += ["--decoders", args.decoders]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"entcal compare --engine {engine} failed (rc {proc.returncode})")
    res = json.loads((out / "results.json").read_text())
    timing = res["timing"]
    return {
        "wall_seconds": round(wall, 1),
        "compare_seconds": timing["seconds"],
        "generate_seconds": timing["generate_seconds"],
        "score_seconds": timing["score_seconds"],
        "ancestral_entce": res["decoders"].get("ancestral", {}).get("entce"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decoders", default=None, help="default: compare's default set")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of each run")
    parser.add_argument("--out", default="benchmarks/results/compare_engines.json")
    args = parser.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="entcal-engines-") as tmp:
        for engine in ENGINES:
            print(f"running compare --engine {engine} ...", flush=True)
            runs[engine] = run_engine(engine, args, Path(tmp))
            print(f"  {runs[engine]}", flush=True)
    hf, vl = runs["transformers"], runs["vllm"]
    result = {
        "benchmark": "compare_engines",
        "settings": {
            "n": args.n,
            "length": args.length,
            "split": args.split,
            "seed": args.seed,
            "decoders": args.decoders or "compare's default set",
            "omp_threads": args.threads,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": runs,
        "speedup_total": round(hf["wall_seconds"] / vl["wall_seconds"], 2),
        "speedup_generate": round(hf["generate_seconds"] / vl["generate_seconds"], 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
