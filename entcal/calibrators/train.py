"""Train the calibrated decoder for a model: predictor, then gate (what ``entcal train`` runs).

1. **Hidden-state projection.** PCA of the model's final hidden states on human text, composed
   with the least-squares inverse of its LM head, so that a logits processor reads the
   projection from a logits row (:class:`~entcal.calibrators.state.HiddenProjection`).
2. **States, every position a label.** For the ``fit_docs`` training documents: the human
   continuation teacher forced (human states), and one ancestral generation of
   ``length + horizon`` tokens from the same prompt (rollout states), each scored teacher forced
   for the per-step raw entropy and projection. Step ``t``'s label is the mean raw entropy of the
   next ``horizon`` steps of the same text minus the model's log loss on that document's human
   continuation: the excess future entropy rate (≈ 0 on human text, large where a generation
   derailed).
3. **Predictor.** :class:`~entcal.calibrators.predictor.FutureEntropyPredictor` (ridge, or an MLP
   that beats it on held-out documents).
4. **Gate, by calibration.** On the next ``gate_docs`` documents, the decoder's strengths per
   position bucket are set so that EntCE = 0 in every bucket, for each threshold tried; the
   calibrated gate of lowest human log-loss cost is kept (:mod:`entcal.calibrators.strength`).

``gate_of`` (``entcal train --gate-of PREDICTOR``) skips steps 1–3 and refits the gate of an
existing predictor (its threshold and buckets; the strengths start from its own), for example to
search a base α_0 without new rollouts.

Everything expensive is cached under ``OUT/data`` (written through temporary files and renames)
and the gate grid in ``OUT/gate_grid.json``, so an interrupted run resumes where it stopped.
Seeded: the same config gives the same predictor.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from entcal.calibrators.config import TrainConfig
from entcal.calibrators.derailment import (
    REFERENCE_WINDOW,
    early_level_along,
    lifted_excess_along,
)
from entcal.calibrators.predictor import FutureEntropyPredictor
from entcal.calibrators.predictor_file import predictor_fingerprint
from entcal.calibrators.state import HiddenProjection, sequence_features, step_stats
from entcal.calibrators.strength import GateEvaluation, fit_gate

__all__ = [
    "TrainConfig",
    "decoder_logprobs",
    "final_hidden",
    "future_excess",
    "sequence_stats",
    "train_predictor",
]


def _batches(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _rows_per_pass(model, steps: int, budget: int = 1 << 30) -> int:
    """Texts per teacher-forced pass so that its float32 logits stay within ``budget`` bytes
    (Gemma's 262k vocabulary: 3 texts of 320 steps per GiB)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, min(8, budget // (steps * vocab * 4)))


def _forward(model, prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]], **kw):
    """One teacher-forced pass over prompt + continuation rows of equal lengths; returns the
    model output and the index of the row predicting the first continuation token."""
    lengths = {len(p) for p in prompts}
    widths = {len(c) for c in conts}
    if len(lengths) != 1 or len(widths) != 1:
        raise ValueError("prompts must share one length and continuations another")
    device = next(model.parameters()).device
    ids = torch.tensor([list(p) + list(c) for p, c in zip(prompts, conts)], device=device)
    return model(input_ids=ids[:, :-1], **kw), lengths.pop() - 1


@torch.inference_mode()
def final_hidden(model, prompts, conts, batch_size: int = 8) -> Tensor:
    """``(n·T, d)`` final hidden states (after the last norm) at the continuation positions."""
    out = []
    for s, e in _batches(len(prompts), batch_size):
        res, start = _forward(model, prompts[s:e], conts[s:e], output_hidden_states=True)
        out.append(
            res.hidden_states[-1][:, start:]
            .float()
            .reshape(-1, res.hidden_states[-1].shape[-1])
            .cpu()
        )
    return torch.cat(out)


@torch.inference_mode()
def sequence_stats(
    model, prompts, conts, projection: HiddenProjection, batch_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per continuation step, teacher forced: raw entropy ``(n, T)``, the hidden projection
    ``(n, T, r)`` and the log-prob of the continuation token ``(n, T)`` (float32, CPU)."""
    ents, zs, lps = [], [], []
    batch_size = batch_size or max(1, _rows_per_pass(model, len(prompts[0]) + len(conts[0])) // 3)
    for s, e in _batches(len(prompts), batch_size):
        res, start = _forward(model, prompts[s:e], conts[s:e])
        logits = res.logits[:, start:].float()
        b, t, v = logits.shape
        lp = torch.log_softmax(logits.reshape(-1, v), dim=-1)
        stats = step_stats(lp, projection.to(lp.device))
        tok = torch.tensor([list(c) for c in conts[s:e]], device=lp.device).reshape(-1, 1)
        ents.append(stats.entropy.reshape(b, t).cpu())
        zs.append(stats.z.reshape(b, t, -1).cpu())
        lps.append(lp.gather(-1, tok).reshape(b, t).cpu())
        del logits, lp
    return torch.cat(ents), torch.cat(zs), torch.cat(lps)


@torch.inference_mode()
def decoder_logprobs(model, prompts, conts, decoder=None, batch_size: int | None = None) -> Tensor:
    """``(n, T)`` log-probs of the continuation tokens, teacher forced, under ``decoder`` applied
    step by step (``reset``, then per step the call and ``observe`` of the true token), or under
    the raw model (``decoder=None``)."""
    out = []
    batch_size = batch_size or _rows_per_pass(model, len(prompts[0]) + len(conts[0]))
    for s, e in _batches(len(prompts), batch_size):
        res, start = _forward(model, prompts[s:e], conts[s:e])
        logits = res.logits[:, start:].float()
        tok = torch.tensor([list(c) for c in conts[s:e]], device=logits.device)
        if decoder is None:
            lp = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0]
        else:
            decoder.reset(e - s)
            cols = []
            for t in range(logits.shape[1]):
                step = torch.log_softmax(decoder(logits[:, t]), -1)
                cols.append(step.gather(-1, tok[:, t, None])[:, 0])
                decoder.observe(tok[:, t])
            lp = torch.stack(cols, 1)
        out.append(lp.cpu())
        del logits
    return torch.cat(out)


def future_excess(entropy: Tensor, level: Tensor, horizon: int, steps: int) -> Tensor:
    """``(n, steps)`` labels: mean of ``entropy[:, t+1 : t+1+horizon]`` (fewer at the end of the
    text; the last step's window is the step itself) minus ``level (n,)``."""
    total = entropy.shape[1]
    if steps > total:
        raise ValueError(f"steps={steps} exceeds the {total} steps of entropy")
    cs = torch.nn.functional.pad(torch.cumsum(entropy.double(), 1), (1, 0))
    t = torch.arange(steps)
    lo = (t + 1).clamp(max=total - 1)
    hi = (t + 1 + horizon).clamp(max=total)
    rate = (cs[:, hi] - cs[:, lo]) / (hi - lo).clamp_min(1)
    return (rate - level.double()[:, None]).float()


def _cached(path: Path, compute):
    """Tensors ``{name: tensor}`` computed once and kept in ``path`` (safetensors).

    Written to a temporary file and renamed, so an interrupted run never leaves a partial file
    under ``path``; a file that cannot be read anyway (cut short or corrupted by other means) is
    reported and computed again.
    """
    from safetensors.torch import load_file, save_file

    if path.exists():
        try:
            return load_file(str(path))
        except Exception as exc:
            print(f"entcal train: cache {path} is unreadable ({exc}); computing it again",
                  file=sys.stderr, flush=True)  # fmt: skip
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in value.items()}, str(tmp))
    tmp.replace(path)
    return value


def _pairs(cfg: TrainConfig, tokenizer):
    from entcal import corpora

    corpus = corpora.load_corpus(cfg.corpus).split("train")
    need = cfg.fit_docs + cfg.gate_docs
    pairs = corpora.make_pairs(
        corpus, tokenizer, prompt_tokens=cfg.prompt_tokens, continuation_tokens=cfg.length,
        n=need, seed=cfg.seed,
    )  # fmt: skip
    if len(pairs) < need:
        raise ValueError(
            f"the training split of {corpus.name} yields {len(pairs)} documents of "
            f"{cfg.prompt_tokens}+{cfg.length} tokens; the config needs {need} "
            "(fit_docs + gate_docs): lower them or --length"
        )
    return [list(p.prompt_ids) for p in pairs], [list(p.continuation_ids) for p in pairs]


def _rollouts(model, tokenizer, prompts, length, cfg: TrainConfig, progress) -> Tensor:
    seed, batch_size = cfg.seed, cfg.batch_size
    if cfg.engine == "vllm":
        from entcal.decoding.vllm.engine import vllm_generate

        if progress:
            print(f"entcal train: rollouts of {len(prompts)} prompts with vLLM", flush=True)
        gens = vllm_generate(
            cfg.model, prompts, ["ancestral"], length=length, seed=seed,
            vllm_args=cfg.vllm_args, progress=progress,
        )  # fmt: skip
        return gens["ancestral"]["tokens"]
    from entcal.generation import generate

    out = []
    for s, e in _batches(len(prompts), batch_size):
        if progress:
            print(f"entcal train: rollouts {s}-{e} of {len(prompts)}", flush=True)
        gens = generate(
            model, tokenizer, prompts[s:e], "ancestral", max_new_tokens=length, seed=seed,
        )  # fmt: skip
        out.append(torch.tensor([g.token_ids for g in gens], dtype=torch.long))
    return torch.cat(out)


def _state_data(model, tokenizer, cfg: TrainConfig, prompts, human, folder: Path, progress):
    """Features and labels of human and rollout states of the fit documents."""
    n = cfg.fit_docs
    lm_head = model.get_output_embeddings().weight
    proj_t = _cached(
        folder / "projection.safetensors",
        lambda: dataclasses.asdict(
            HiddenProjection.fit(
                lm_head, final_hidden(model, prompts[: min(n, 32)], human[: min(n, 32)]),
                dim=cfg.projection_dim,
            )
        ),
    )  # fmt: skip
    projection = HiddenProjection(proj_t["tokens"], proj_t["matrix"], proj_t["offset"])
    human_t = _cached(
        folder / "human_fit.safetensors",
        lambda: dict(zip(("entropy", "z", "logprob"), sequence_stats(model, prompts[:n], human[:n], projection))),
    )  # fmt: skip
    tokens = _cached(
        folder / "rollouts.safetensors",
        lambda: {
            "tokens": _rollouts(
                model, tokenizer, prompts[:n], cfg.length + cfg.horizon, cfg, progress
            )
        },
    )["tokens"]  # fmt: skip
    roll_t = _cached(
        folder / "rollout_stats.safetensors",
        lambda: dict(zip(("entropy", "z", "logprob"), sequence_stats(model, prompts[:n], tokens.tolist(), projection))),
    )  # fmt: skip
    level = -human_t["logprob"].double().mean(1)  # the model's log loss per human document
    steps = cfg.length
    x_h = sequence_features(human_t["entropy"], human_t["z"])
    x_g = sequence_features(roll_t["entropy"][:, :steps], roll_t["z"][:, :steps])
    y_h = future_excess(human_t["entropy"], level, cfg.horizon, steps)
    y_g = future_excess(roll_t["entropy"], level, cfg.horizon, steps)
    feats = torch.cat([x_h.reshape(-1, x_h.shape[-1]), x_g.reshape(-1, x_g.shape[-1])])
    labels = torch.cat([y_h.reshape(-1), y_g.reshape(-1)])
    doc = torch.arange(n)[:, None].expand(n, steps).reshape(-1)
    groups = torch.cat([doc, doc])
    info = {
        "human_log_loss": float(level.mean()),
        "human_entropy": float(human_t["entropy"].mean()),
        "rollout_entropy": float(roll_t["entropy"][:, :steps].mean()),
        "label_mean_human": float(y_h.mean()),
        "label_mean_rollout": float(y_g.mean()),
        "n_states": int(labels.numel()),
    }
    return projection, feats, labels, groups, info


class _GateEvaluator:
    """Generates with a gate on the gate documents and scores it (EntCE per bucket, cost)."""

    def __init__(self, model, tokenizer, predictor, cfg: TrainConfig, prompts, human, progress):
        self.model, self.tokenizer, self.predictor = model, tokenizer, predictor
        self.cfg, self.prompts, self.human, self.progress = cfg, prompts, human, progress
        self.raw_loss = -decoder_logprobs(model, prompts, human).double()
        # the gate's features on human text do not depend on the gate: D̂ once, and the human
        # reference level ℓ that a lift lifts to (a low quantile of these documents' early
        # levels: a lift toward their mean would lift half of them and cost log loss)
        entropy, z, _ = sequence_stats(model, prompts, human, predictor.projection_)
        derail = predictor.predict_tensor(sequence_features(entropy, z))
        end = min(cfg.warmup + REFERENCE_WINDOW, derail.shape[1]) - 1
        early = early_level_along(derail, cfg.warmup)[:, end]
        self.reference_level = float(torch.quantile(early, cfg.lift_quantile))
        self.human_derail = lifted_excess_along(
            derail, cfg.warmup, cfg.lift or 0.0, self.reference_level
        )
        self.buckets = torch.bucketize(
            torch.arange(cfg.length), torch.tensor(list(cfg.bucket_edges)), right=True
        )

    def _bucket_means(self, values: Tensor) -> list[float]:
        n_b = len(self.cfg.bucket_edges) + 1
        # a bucket past the generation length holds no step: no error to correct
        return [
            float(values[:, self.buckets == b].mean()) if bool((self.buckets == b).any()) else 0.0
            for b in range(n_b)
        ]

    def __call__(self, threshold: float, strength: list[float], base: float) -> GateEvaluation:
        from entcal.calibrators.calibrated import CalibratedDecoder
        from entcal.generation import generate

        t0 = time.time()
        dec = CalibratedDecoder.from_predictor(
            self.predictor, strength, threshold, base, warmup=self.cfg.warmup,
            lift=self.cfg.lift, reference_level=self.reference_level,
        )  # fmt: skip
        gens = generate(
            self.model, self.tokenizer, self.prompts, dec, max_new_tokens=self.cfg.length,
            seed=self.cfg.seed + 12345, batch_size=self.cfg.batch_size,
        )  # fmt: skip
        gen_entropy = torch.stack([g.entropy for g in gens]).double()
        loss = -decoder_logprobs(self.model, self.prompts, self.human, dec).double()
        entce_b = [h - x for h, x in zip(self._bucket_means(gen_entropy), self._bucket_means(loss))]
        ev = GateEvaluation(
            threshold=float(threshold),
            strength=[float(g) for g in strength],
            entce_buckets=entce_b,
            entce=float(gen_entropy.mean() - loss.mean()),
            cost=float(loss.mean() - self.raw_loss.mean()),
            gated_human_fraction=float(
                (self.human_derail[:, self.cfg.warmup :] > threshold).float().mean()
            ),
            base=float(base),
        )
        if self.progress:
            print(
                f"entcal train: gate c={threshold:.3f} g={[round(g, 3) for g in strength]} "
                f"base={base:g}: "
                f"EntCE {ev.entce:+.3f} (buckets {[round(e, 3) for e in entce_b]}), "
                f"cost {ev.cost:+.4f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
        return ev


#: what decides a run's documents: a gate refit must draw the same ones as the predictor's run
_DOCUMENT_FIELDS = ("corpus", "seed", "fit_docs", "gate_docs", "prompt_tokens", "length")


def _check_same_documents(cfg: TrainConfig, trained: dict | None, folder: str) -> None:
    """``ValueError`` unless ``cfg`` selects the documents the predictor in ``folder`` was trained
    with (files of older releases do not record their config: nothing to check)."""
    if not trained:
        return
    differ = [
        f"{k}={getattr(cfg, k)!r} (the predictor's run: {trained.get(k)!r})"
        for k in _DOCUMENT_FIELDS
        if k in trained and trained[k] != getattr(cfg, k)
    ]
    if differ:
        raise ValueError(
            f"--gate-of {folder}: the gate documents would differ from the predictor's run: "
            + "; ".join(differ)
        )


def train_predictor(
    cfg: TrainConfig,
    out: str | Path,
    model=None,
    tokenizer=None,
    progress: bool = True,
    load: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole recipe; writes ``OUT/predictor/`` and ``OUT/report.json``; returns the report.

    ``load``: :func:`entcal.models.load`'s device arguments (``device``, ``dtype``,
    ``device_map``) when the model is loaded here; they are not part of the run's configuration
    (a run resumes on another device).

    Raises ``ValueError`` for a bad config, a corpus too small for it, or an ``OUT`` folder that
    holds a run with other settings.
    """
    from entcal import models

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key, default in (
        ("engine", "transformers"), ("vllm_args", {}), ("base_alphas", [0.0]), ("gate_of", None),
        ("warmup", None), ("lift", None), ("lift_quantile", None),
    ):  # fmt: skip
        # runs of the default engine, without a base or a warm-up, keep the config.json of older
        # releases
        if cfg_json[key] == default:
            del cfg_json[key]
    cfg_path = out / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != cfg_json:
        raise ValueError(
            f"{out} holds a run with a different configuration ({cfg_path}); "
            "use a new --out folder to train with other settings"
        )
    cfg_path.write_text(json.dumps(cfg_json, indent=2))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if model is None:
        model, tokenizer = models.load(cfg.model, **(load or {}))
    prompts, human = _pairs(cfg, tokenizer)
    fp = predictor_fingerprint(model, cfg.model)
    start: float | list[float] = cfg.gate_start
    if cfg.gate_of is not None:
        # the gate alone: predictor, threshold and buckets as fitted, strengths from its own
        pred = FutureEntropyPredictor.load(cfg.gate_of, model=model)
        old = pred.meta_.get("report", {})
        _check_same_documents(cfg, old.get("config"), cfg.gate_of)
        # states and predictor come from the earlier run, the gate from this one
        refit = {"folder": cfg.gate_of, "config": old.get("config")}
        info, scores = old.get("states", {}), old.get("predictor", pred.scores_)
        edges, start = list(pred.gate_["bucket_edges"]), list(pred.gate_["strength"])
        thresholds = [pred.gate_["threshold"]]
        cfg = dataclasses.replace(cfg, bucket_edges=tuple(edges))
    else:
        projection, feats, labels, groups, info = _state_data(
            model, tokenizer, cfg, prompts, human, out / "data", progress
        )
        pred = FutureEntropyPredictor(estimator=cfg.estimator, random_state=cfg.seed)
        pred.fit(feats.numpy(), labels.numpy(), groups.numpy())
        pred.projection_ = projection
        pred.meta_ = {"fingerprint": fp, "horizon": cfg.horizon}
        scores, edges, refit = pred.scores_, list(cfg.bucket_edges), None
        # the buckets are fixed; the gate's values are what the search below sets
        pred.gate_ = {
            "threshold": 0.0, "strength": [0.0] * (len(edges) + 1), "bucket_edges": edges,
            "base": 0.0,
        }  # fmt: skip
    # a refit keeps its predictor's warm-up and lift (a new gate has none: 0)
    if cfg.warmup is None:
        cfg = dataclasses.replace(cfg, warmup=pred.gate_.get("warmup", 0))
    if cfg.lift is None:
        cfg = dataclasses.replace(cfg, lift=pred.gate_.get("lift", 0.0))
    if cfg.lift_quantile is None:  # (a refit measures ℓ as the predictor's run did)
        own = (pred.meta_.get("report", {}).get("config") or {}).get("lift_quantile")
        cfg = dataclasses.replace(cfg, lift_quantile=0.25 if own is None else own)
    gp, gh = prompts[cfg.fit_docs :], human[cfg.fit_docs :]
    evaluate = _GateEvaluator(model, tokenizer, pred, cfg, gp, gh, progress)
    if cfg.gate_of is None:
        thresholds = [
            # (quantiles of the steps where the gate can open: after the warm-up)
            float(torch.quantile(evaluate.human_derail[:, cfg.warmup :].flatten(), q))
            for q in cfg.threshold_quantiles
        ]
    best, grid = fit_gate(
        evaluate, thresholds, len(edges) + 1, rounds=cfg.gate_rounds,
        tolerance=cfg.entce_tolerance, start=start, log_path=out / "gate_grid.json",
        bases=cfg.base_alphas,
    )  # fmt: skip
    pred.gate_ = {
        "threshold": best.threshold, "strength": best.strength, "bucket_edges": edges,
        "base": best.base, "warmup": cfg.warmup,
    }  # fmt: skip
    if cfg.lift:  # (absent: no lift, as in files written before it existed)
        pred.gate_["lift"] = float(cfg.lift)
        pred.gate_["reference_level"] = evaluate.reference_level
    report: dict[str, Any] = {
        "config": cfg_json,
        "fingerprint": fp,
        "states": info,
        "predictor": scores,
        "gate": best.to_json(),
        "gate_grid": [e.to_json() for e in grid],
        "seconds": round(time.time() - t0, 1),
    }
    if refit is not None:
        report["gate_of"] = refit
    keep = ("config", "states", "predictor", "gate", "seconds", "gate_of")
    pred.meta_["report"] = {k: report[k] for k in keep if k in report}
    pred.save(out / "predictor", fingerprint=fp)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report
