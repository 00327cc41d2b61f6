"""Generation on many machines: Ray Data with one vLLM engine per actor (``--engine ray``).

The rows of a comparison (every decoder spec × prompt × sample) become a ``ray.data`` dataset;
``map_batches`` sends them to actors that each hold one :class:`~entcal.decoding.vllm.engine.
VLLMGenerator` (a ``vllm.LLM`` with entcal's logits processor registered), and every row carries
its own spec and its seed's coordinates, so a continuation does not depend on which actor or
batch produced it. The results are written per shard (Ray's JSON-lines writer, one file per
block) into a generations folder, and :func:`read_generations` reads such a folder back into
what :func:`entcal.decoding.vllm.engine.vllm_generate` returns; ``entcal compare --from-generations
DIR`` scores and reports a folder produced elsewhere.

Ray is an optional dependency (``pip install 'entcal[ray]'``); the workers need entcal and vLLM
installed (Ray's ``runtime_env`` or the cluster's image). Without an address Ray starts locally.

Row schema of a generations folder (``*.json`` files of JSON lines, in the folder or any
subfolder; other files are ignored):
``spec`` (canonical decoder spec), ``prompt`` (index), ``sample`` (index), ``prompt_token_ids``,
``tokens`` (the continuation) and, when the engine returned it, ``raw_logprob`` (the raw model's
log-prob of each sampled token, nats).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["generation_rows", "ray_generate", "read_generations", "specs_in", "write_generations"]


def generation_rows(
    prompts: Sequence[Sequence[int]], specs: Sequence[str], samples: int = 1
) -> list[dict[str, Any]]:
    """One row per (spec, prompt, sample): ``spec``, ``prompt``, ``sample``,
    ``prompt_token_ids``."""
    return [
        {"spec": spec, "prompt": i, "sample": j, "prompt_token_ids": list(map(int, p))}
        for spec in specs
        for i, p in enumerate(prompts)
        for j in range(samples)
    ]


def ray_generate(
    model: str,
    prompts: Sequence[Sequence[int]],
    specs: Sequence[str],
    out_dir: str | Path,
    *,
    length: int,
    samples: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    vllm_args: Mapping[str, Any] | None = None,
    address: str | None = None,
    actors: int = 1,
    batch_size: int = 64,
    actor_cpus: float | None = None,
    actor_gpus: float | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Generate every (spec, prompt, sample) through Ray Data and vLLM, write the shards into
    ``out_dir`` and return them as :func:`entcal.decoding.vllm.engine.vllm_generate` does.

    Args:
        model: an embedded name, a folder (visible to the workers) or a hub id.
        out_dir: the generations folder (created; must not hold generations already).
        address: a Ray cluster address (``auto``, ``ray://host:10001``); ``None`` starts or
            joins a local Ray.
        actors: vLLM engines (Ray actors) running at once.
        batch_size: rows per ``map_batches`` batch (one ``LLM.generate`` call).
        actor_cpus, actor_gpus: resources each actor reserves (``actor_gpus=None``: the
            engine's ``tensor_parallel_size`` when the cluster has GPUs, else none; CPUs: Ray's
            default).
        length, samples, seed, dtype, vllm_args: as ``vllm_generate``.

    Raises:
        ValueError: Ray or vLLM not installed, a spec vLLM rejects, an address Ray cannot parse
            or join, or ``out_dir`` already holds generations.
    """
    try:
        import ray
    except ImportError as exc:
        raise ValueError(
            f"--engine ray needs Ray Data ({exc}); pip install 'entcal[ray]'"
        ) from None
    from entcal.decoding.vllm.engine import VLLMGenerator, check_specs

    if actors < 1 or batch_size < 1:
        raise ValueError(f"actors and batch_size must be >= 1, got {actors} and {batch_size}")
    check_specs(specs)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.rglob("*.json")):
        raise ValueError(f"{out_dir} already holds generations; use --from-generations to read")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"Ray address {address!r}: cannot start or join Ray ({exc})") from None
    try:
        resources: dict[str, Any] = {}
        if actor_cpus is not None:
            resources["num_cpus"] = actor_cpus
        if actor_gpus is None and ray.cluster_resources().get("GPU", 0) > 0:
            # an actor without a GPU would start vLLM's CPU settings on a GPU build
            actor_gpus = (vllm_args or {}).get("tensor_parallel_size", 1)
        if actor_gpus is not None:
            resources["num_gpus"] = actor_gpus
        rows = generation_rows(prompts, specs, samples)
        dataset = ray.data.from_items(rows).map_batches(
            VLLMGenerator,
            fn_constructor_kwargs={
                "model": model,
                "length": length,
                "max_prompt_tokens": max(len(p) for p in prompts),
                "seed": seed,
                "dtype": dtype,
                "vllm_args": dict(vllm_args or {}),
            },
            batch_size=batch_size,
            concurrency=actors,
            **resources,
        )
        dataset.write_json(str(out_dir))
    finally:
        if started:  # a Ray this call started does not outlive it
            ray.shutdown()
    return read_generations(out_dir, prompts, specs, samples=samples, length=length)


def write_generations(
    folder: str | Path,
    prompts: Sequence[Sequence[int]],
    generations: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    samples: int = 1,
    shard: str = "generations",
) -> Path:
    """Write generations (``{spec: {"tokens": [len(prompts)·samples, length], "raw_logprob":
    optional}}``, prompt-major, as :func:`read_generations` returns) as one shard
    ``folder/SHARD.json`` in the row schema; returns its path. How a generation made by any
    engine is handed to ``entcal compare --from-generations``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{shard}.json"
    with path.open("w") as f:
        for spec, gen in generations.items():
            raw = gen.get("raw_logprob")
            for r, tokens in enumerate(gen["tokens"].tolist()):
                i, j = divmod(r, samples)
                row = {
                    "spec": spec,
                    "prompt": i,
                    "sample": j,
                    "prompt_token_ids": list(map(int, prompts[i])),
                    "tokens": tokens,
                }
                if raw is not None:
                    row["raw_logprob"] = raw[r].tolist()
                f.write(json.dumps(row) + "\n")
    return path


def _canonical(spec: str, where: str, memo: dict[str, str]) -> str:
    """The canonical form of a row's spec (``str(parse(spec))``), so that a folder written with
    ``mirostat:tau=3`` matches compare's ``mirostat:tau=3,eta=0.1``."""
    if spec not in memo:
        from entcal.decoding import parse

        try:
            memo[spec] = str(parse(spec))
        except Exception as exc:
            raise ValueError(f"{where}: decoder {spec!r} is not valid: {exc}") from None
    return memo[spec]


def _shards(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    files = sorted(folder.rglob("*.json")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"no generations (*.json shards) in {folder}")
    return files


def specs_in(folder: str | Path) -> list[str]:
    """The decoder specs of a generations folder, in the order first seen.

    Raises:
        ValueError: no shards, or a line that is not JSON with a ``spec`` (named).
    """
    folder = Path(folder)
    specs: dict[str, None] = {}
    memo: dict[str, str] = {}
    for path in _shards(folder):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                where = f"{path.relative_to(folder)} line {line_no}"
                try:
                    spec = str(json.loads(line)["spec"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{where}: not a generation row ({exc!r})") from None
                specs[_canonical(spec, where, memo)] = None
    return list(specs)


def read_generations(
    folder: str | Path,
    prompts: Sequence[Sequence[int]],
    specs: Sequence[str] | None = None,
    *,
    samples: int = 1,
    length: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """A generations folder as ``{spec: {"tokens": [len(prompts)·samples, length] int64,
    "raw_logprob": same shape float32 (when every row has it)}}``, prompt-major.

    ``specs=None`` takes every spec in the folder, in the order first seen. Specs are compared in
    canonical form (``str(entcal.decoding.parse(spec))``); the result is keyed by it.

    Raises:
        ValueError: no generations in ``folder``; a malformed row (named by file and line); a
            row whose prompt differs from ``prompts[prompt]`` (the folder was made for other
            prompts); a continuation of another length; a (spec, prompt, sample) missing or
            repeated.
    """
    folder = Path(folder)
    files = _shards(folder)
    found: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    memo: dict[str, str] = {}
    for path in files:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.relative_to(folder)} line {line_no}"
            try:
                row = json.loads(line)
                spec, i, j = str(row["spec"]), int(row["prompt"]), int(row["sample"])
                tokens = [int(t) for t in row["tokens"]]
                prompt_ids = [int(t) for t in row["prompt_token_ids"]]
                raw = row.get("raw_logprob")
                raw = None if raw is None else [float(x) for x in raw]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{where}: not a generation row ({exc!r})") from None
            if not (0 <= i < len(prompts)) or not (0 <= j < samples):
                raise ValueError(
                    f"{where}: prompt {i}, sample {j} is outside this run "
                    f"({len(prompts)} prompts × {samples} samples)"
                )
            if prompt_ids != list(map(int, prompts[i])):
                raise ValueError(
                    f"{where}: prompt {i} differs from this run's prompt {i}: the folder was "
                    "generated for other settings (model, corpus, split, n or prompt tokens)"
                )
            if len(tokens) != length or (raw is not None and len(raw) != length):
                raise ValueError(f"{where}: {len(tokens)} tokens, this run's length is {length}")
            spec = _canonical(spec, where, memo)
            slots = found.setdefault(spec, {})
            if (i, j) in slots:
                raise ValueError(f"{where}: spec {spec!r} prompt {i} sample {j} appears twice")
            slots[(i, j)] = {"tokens": tokens, "raw_logprob": raw}
    wanted = list(found) if specs is None else [_canonical(s, "specs", memo) for s in specs]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for spec in wanted:
        slots = found.get(spec, {})
        order = [(i, j) for i in range(len(prompts)) for j in range(samples)]
        missing = [key for key in order if key not in slots]
        if missing:
            have = ", ".join(found) or "none"
            raise ValueError(
                f"{folder}: decoder {spec!r} lacks {len(missing)} of {len(order)} generations "
                f"(first: prompt {missing[0][0]}, sample {missing[0][1]}); specs present: {have}"
            )
        gen = {"tokens": torch.tensor([slots[k]["tokens"] for k in order], dtype=torch.long)}
        if all(slots[k]["raw_logprob"] is not None for k in order):
            gen["raw_logprob"] = torch.tensor(
                [slots[k]["raw_logprob"] for k in order], dtype=torch.float32
            )
        out[spec] = gen
    return out
