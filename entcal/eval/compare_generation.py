"""The generation step of ``entcal compare``, per engine, resumable.

* ``transformers``: :func:`entcal.generate`, which records the exact statistics of the sampling
  distribution while it samples; cached per decoder and prompt batch under ``OUT/cache``.
* ``vllm``: :func:`entcal.decoding.vllm.engine.vllm_generate`, token ids only; cached per decoder.
* ``ray``: :func:`entcal.eval.ray_engine.ray_generate`, shards under ``OUT/generations``.
* ``files`` (``--from-generations``): a generations folder read as it is.

For every engine but transformers the per-step statistics of the sampled distribution are
filled in afterwards from the teacher-forced scores (:func:`statistics_from_scores`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from entcal.eval.results_cache import decoder_key, digest, load_cached, save_cached

__all__ = ["generate_all", "log", "statistics_from_scores"]


def log(msg: str, progress: bool) -> None:
    """A progress line of ``entcal compare`` on stderr (when ``progress``)."""
    if progress:
        print(f"entcal compare: {msg}", file=sys.stderr, flush=True)


def generate_all(engine, model, tokenizer, prompts, decoders, config, base_key, out: Path) -> dict:
    """``{spec: {"tokens": [n·samples, length], ...statistics}}`` from ``engine`` (transformers,
    vllm, ray or files), prompt-major, from the caches where possible."""
    if engine == "files":
        from entcal.eval.ray_engine import read_generations

        return read_generations(
            config.from_generations, prompts, list(decoders),
            samples=config.samples, length=config.length,
        )  # fmt: skip
    if engine == "ray":
        return _generate_ray(prompts, decoders, config, base_key, out / "generations")
    if engine == "vllm":
        return _generate_vllm(prompts, decoders, config, base_key, out / "cache")
    return _generate_transformers(
        model, tokenizer, prompts, decoders, config, base_key, out / "cache"
    )


def _generate_transformers(model, tokenizer, prompts, decoders, config, base_key, cache):
    """``{spec: dict of [n, length] tensors}``, from the cache where possible."""
    from tqdm.auto import tqdm

    from entcal import generate

    n = len(prompts)
    bs = config.batch_size
    batches = [(s, min(n, s + bs)) for s in range(0, n, bs)]
    keys = ("logprob", "raw_logprob", "entropy", "raw_entropy", "varentropy", "raw_varentropy")
    result = {}
    bar = tqdm(
        total=len(decoders) * n * config.samples,
        unit="text",
        desc="generating",
        disable=not config.progress,
    )
    try:
        for spec, dec in decoders.items():
            parts = []
            for s, e in batches:
                # "sampler": generations drawn per sequence (batch-independent); older cache
                # entries, drawn from one RNG per batch, are not reused.
                key = digest(
                    {**base_key, **decoder_key(spec, dec), "rows": [s, e], "what": "gen",
                     "sampler": 2}
                )  # fmt: skip
                path = cache / f"gen-{key}.pt"
                data = load_cached(path)
                if data is None:
                    bar.set_postfix_str(spec)
                    gens = generate(
                        model, tokenizer, prompts[s:e], decoder=dec, n=config.samples,
                        max_new_tokens=config.length, seed=config.seed,
                    )  # fmt: skip
                    data = {k: torch.stack([getattr(g, k) for g in gens]) for k in keys}
                    data["tokens"] = torch.tensor([g.token_ids for g in gens], dtype=torch.long)
                    save_cached(path, data)
                parts.append(data)
                bar.update((e - s) * config.samples)
            result[spec] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    finally:
        bar.close()
    return result


def _generate_vllm(prompts, decoders, config, base_key, cache):
    """``{spec: {"tokens": [n·samples, length], "raw_logprob": ...}}`` from vLLM, one cache entry
    per decoder."""
    from entcal.decoding.vllm.engine import vllm_generate

    result, missing, paths = {}, [], {}
    for spec, dec in decoders.items():
        key = digest({**base_key, **decoder_key(spec, dec), "what": "gen-vllm"})
        paths[spec] = cache / f"gen-{key}.pt"
        data = load_cached(paths[spec])
        if data is None:
            missing.append(spec)
        else:
            result[spec] = data
    if missing:
        log(f"generating with vLLM: {'; '.join(missing)}", config.progress)
        sampled = vllm_generate(
            config.model, prompts, missing, length=config.length, samples=config.samples,
            seed=config.seed, dtype=config.dtype, vllm_args=config.vllm_args, progress=config.progress,
        )  # fmt: skip
        for spec in missing:
            result[spec] = sampled[spec]
            save_cached(paths[spec], result[spec])
    return {spec: result[spec] for spec in decoders}


def _generate_ray(prompts, decoders, config, base_key, folder: Path):
    """Every decoder's generations through Ray Data (:mod:`entcal.eval.ray_engine`), as shards
    in ``folder``: one subfolder per generating call, holding the decoders it generated.

    ``folder/KEY`` records the settings the shards were made with. A rerun with the same
    settings reads every complete subfolder and generates only the decoders still missing (an
    interrupted call's incomplete subfolder is removed); other settings start the folder anew.
    """
    import shutil

    from entcal.eval.ray_engine import ray_generate, read_generations

    specs = list(decoders)
    key_file, key = folder / "KEY", digest({**base_key, "what": "gen-ray"})
    if folder.is_dir() and (not key_file.exists() or key_file.read_text().strip() != key):
        if any(folder.rglob("*.json")):  # said whatever the progress setting
            log(
                f"{folder} holds generations of other settings (or none recorded): removing "
                "them and generating again",
                True,
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key + "\n")  # before any shard: every shard below belongs to this key
    result: dict[str, dict] = {}
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            got = read_generations(part, prompts, samples=config.samples, length=config.length)
        except ValueError as exc:
            log(f"removing the incomplete {part.name} ({exc})", config.progress)
            shutil.rmtree(part)
            continue
        result.update(
            {spec: gen for spec, gen in got.items() if _same_content(part, spec, decoders)}
        )
    missing = [spec for spec in specs if spec not in result]
    if missing:
        log(f"generating with Ray Data + vLLM: {'; '.join(missing)}", config.progress)
        part = folder / f"part-{digest(missing)[:12]}"
        if part.exists():
            shutil.rmtree(part)
        generated = ray_generate(
            config.model, prompts, missing, part, length=config.length, samples=config.samples,
            seed=config.seed, dtype=config.dtype, vllm_args=config.vllm_args,
            address=config.ray_address, actors=config.ray_actors,
            actor_gpus=config.ray_actor_gpus,
        )  # fmt: skip
        (part / _CONTENT).write_text(
            json.dumps({spec: decoders[spec].cache_key() for spec in missing}, sort_keys=True)
        )
        result.update(generated)
    return {spec: result[spec] for spec in specs}


#: per part of a Ray generations folder: ``{spec: Decoder.cache_key()}`` of what it generated
_CONTENT = "CONTENT"  # (not *.json: those are the shards)


def _same_content(part: Path, spec: str, decoders: dict) -> bool:
    """Whether ``part``'s generations of ``spec`` came from the decoder this run holds (for a
    file-reading decoder, the same predictor file); parts written before the record existed
    count as made by the spec alone."""
    if spec not in decoders:
        return False
    path = part / _CONTENT
    recorded = json.loads(path.read_text()) if path.exists() else {}
    return recorded.get(spec, spec) == decoders[spec].cache_key()


def statistics_from_scores(generations: dict, scores: dict) -> None:
    """Fill each vLLM generation's per-step statistics from its teacher-forced scores: the
    decoder's distribution along its own tokens, and the raw model's. The raw log-prob vLLM
    returned, where it did, stays (the results' engine-vs-scorer check compares the two; without
    it the check is ``None``)."""
    for spec, gen in generations.items():
        gs = scores[spec]
        proc, raw = gs.processed[spec], gs.raw
        gen.update(
            logprob=proc.logprob, entropy=proc.entropy, varentropy=proc.varentropy,
            raw_entropy=raw.entropy, raw_varentropy=raw.varentropy,
        )  # fmt: skip
