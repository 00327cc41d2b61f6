"""Train a future-entropy predictor and its α for a model (what ``entcal train`` runs).

A practical version of Algorithm 1 of Cao, Valiant & Liang (arXiv 2511.11966):

1. **Labels, round 0.** At human prefixes (training split), for candidates (top-k, the human
   token, tail samples), the k-step Monte-Carlo future entropy under the raw model
   (:mod:`entcal.calibrators.montecarlo`): per document for k = 1 (exact labels), batched over
   documents that share their offsets for k > 1 (one decode batch serves many prefixes).
2. **Predictor.** Ridge vs MLP on features a logits processor can compute, chosen by held-out R².
3. **α.** Minimize human log loss of ``p_α`` on held-out human positions (a single α and one per
   position bucket; convex 1-D problems).
4. **Refit round(s).** New labels from rollouts of the *adjusted* model (predictor and α of the
   previous round), a new predictor, α fitted again (the paper's fixed point).

Every Monte-Carlo chunk (one human document) is written to ``OUT/data/roundR/`` as it finishes,
so an interrupted run resumes where it stopped. Seeded: the same config gives the same predictor.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entcal.calibrators.alpha import AlphaFit, fit_alpha
from entcal.calibrators.config import TrainConfig
from entcal.calibrators.features import candidate_features, token_table
from entcal.calibrators.montecarlo import (
    batched_rollout_entropy,
    choose_candidates,
    expand_cache,
    hf_step_fn,
    rollout_entropy,
)
from entcal.calibrators.ops import entropy_stats
from entcal.calibrators.predictor import FutureEntropyPredictor, predictor_fingerprint

__all__ = ["TrainConfig", "collect_alpha_rows", "collect_labels", "train_predictor"]


def _generator(seed: int, *parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + sum(p * 7919**i for i, p in enumerate(parts, 1)))
    return g


def _offsets(n_cont: int, k: int, gen: torch.Generator) -> list[int]:
    k = min(k, n_cont)
    return sorted(torch.randperm(n_cont, generator=gen)[:k].tolist(), reverse=True)


_LABEL_KEYS = ("X", "y", "group", "position", "logp", "is_human")


def _chunked_labels(items, folder: Path | None, name: str, desc: str, progress: bool, compute):
    """Run ``compute(i, item) -> {key: rows}`` per item, each result kept as ``folder/NAME-i.npz``
    (written atomically; an existing file is reused, so an interrupted run resumes there)."""
    from tqdm.auto import tqdm

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i, item in enumerate(tqdm(items, desc=desc, disable=not progress)):
        path = folder / f"{name}-{i:05d}.npz" if folder is not None else None
        if path is not None and path.exists():
            with np.load(path) as data:
                chunks.append({k: data[k] for k in data.files})
            continue
        rows = compute(i, item)
        chunk = {k: np.concatenate(rows[k]) for k in _LABEL_KEYS}
        if path is not None:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **chunk)
            tmp.replace(path)
        chunks.append(chunk)
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _add_rows(rows: dict[str, list], **values) -> None:
    for key, value in values.items():
        rows[key].append(value.cpu().numpy() if isinstance(value, torch.Tensor) else value)


@torch.inference_mode()
def collect_labels(
    model,
    pairs,
    cfg: TrainConfig,
    table: torch.Tensor,
    folder: Path | None,
    round_index: int,
    adjust=None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Monte-Carlo labels at human prefixes of ``pairs``; one ``.npz`` chunk per document.

    Returns arrays ``X`` (features), ``y`` (future entropy), ``group`` (prefix id), ``position``,
    ``logp`` (candidate log-prob), ``is_human``.
    """
    device = model.get_output_embeddings().weight.device
    step = hf_step_fn(model)

    def compute(i, pair):
        gen = _generator(cfg.seed, round_index, i)
        ids = torch.tensor(list(pair.prompt_ids) + list(pair.continuation_ids), device=device)
        n_prompt = len(pair.prompt_ids)
        offsets = _offsets(len(pair.continuation_ids), cfg.positions_per_pair, gen)
        stop = n_prompt + max(offsets)
        out = model(input_ids=ids[None, :stop], use_cache=True)
        cache = out.past_key_values
        all_lp = torch.log_softmax(out.logits[0].float(), dim=-1)
        rows: dict[str, list] = {k: [] for k in _LABEL_KEYS}
        for o in offsets:
            length = n_prompt + o  # prefix ids[:length]; the next human token is ids[length]
            lp = all_lp[length - 1]
            if adjust is not None:
                lp = adjust(lp[None], torch.tensor([o], device=device))[0]
            human = int(ids[length])
            cand = choose_candidates(lp, human, cfg.top_k, cfg.n_tail, gen)
            state = expand_cache(cache, length, cand.shape[0])
            y = rollout_entropy(step, state, cand, cfg.horizon, gen, adjust=adjust, position=o)
            raw_lp = all_lp[length - 1][None]
            feats = candidate_features(
                raw_lp, cand[None], torch.tensor([o], device=device), table, entropy_stats(raw_lp)
            )[0]
            _add_rows(
                rows, X=feats, y=y, group=np.full(cand.shape[0], i * 10_000 + o),
                position=np.full(cand.shape[0], o), logp=raw_lp[0, cand], is_human=cand == human,
            )  # fmt: skip
        return rows

    desc = f"entcal train: labels round {round_index}"
    return _chunked_labels(pairs, folder, "chunk", desc, progress, compute)


def _rollout_candidates(
    logprobs: torch.Tensor, human: torch.Tensor, top_k: int, n_tail: int, gen: torch.Generator
) -> torch.Tensor:
    """``(N, top_k + 1 + n_tail)`` distinct candidates per row: the top-k, the human token, and
    tail tokens drawn ∝ p from outside both (one more where the human token is in the top-k)."""
    top = torch.topk(logprobs, top_k, dim=-1).indices
    tail_p = logprobs.exp()
    tail_p.scatter_(1, top, 0.0)
    tail_p.scatter_(1, human[:, None], 0.0)
    tail_p.clamp_min_(1e-30)  # a row whose whole mass sits in the top-k still draws something
    draws = torch.multinomial(tail_p, n_tail + 1, replacement=False, generator=gen)
    human_in_top = (top == human[:, None]).any(-1, keepdim=True)
    extra = torch.where(human_in_top, draws[:, :1], human[:, None])
    return torch.cat([top, extra, draws[:, 1:]], dim=-1)


@torch.inference_mode()
def collect_rollout_labels(
    model,
    pairs,
    cfg: TrainConfig,
    table: torch.Tensor,
    folder: Path | None,
    round_index: int,
    adjust=None,
    progress: bool = True,
    docs_per_batch: int = 8,
) -> dict[str, np.ndarray]:
    """k-step Monte-Carlo labels, many prefixes per decode batch; one ``.npz`` chunk per group.

    Documents are taken ``docs_per_batch`` at a time and share their offsets, so the prefixes of
    one rollout batch (one offset, every document of the group) have one length: no padding.
    Each prefix gets ``top_k + 1 + n_tail`` candidates (:func:`_rollout_candidates`), each one
    rollout of ``cfg.horizon`` steps of the sampled process (raw, or ``adjust``-ed).
    Returns the arrays of :func:`collect_labels`.
    """
    device = model.get_output_embeddings().weight.device
    groups = [pairs[s : s + docs_per_batch] for s in range(0, len(pairs), docs_per_batch)]

    def compute(gi, group):
        gen = _generator(cfg.seed, round_index, gi)
        n_prompt = len(group[0].prompt_ids)
        n_cont = min(len(p.continuation_ids) for p in group)
        ids = torch.tensor(
            [list(p.prompt_ids) + list(p.continuation_ids)[:n_cont] for p in group], device=device
        )
        all_lp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), dim=-1)
        rows: dict[str, list] = {k: [] for k in _LABEL_KEYS}
        for o in _offsets(n_cont - 1, cfg.positions_per_pair, gen):
            length = n_prompt + o  # prefixes ids[:, :length]; the human token is ids[:, length]
            raw_lp = all_lp[:, length - 1]
            pos = torch.full((len(group),), o, device=device)
            lp = adjust(raw_lp, pos) if adjust is not None else raw_lp
            human = ids[:, length]
            cand = _rollout_candidates(lp, human, cfg.top_k, cfg.n_tail, gen)
            y = batched_rollout_entropy(
                model, ids[:, :length].tolist(), cand, pos, cfg.horizon, gen, adjust
            )
            feats = candidate_features(raw_lp, cand, pos, table, entropy_stats(raw_lp))
            doc = torch.arange(len(group), device=device)[:, None].expand_as(cand)
            _add_rows(
                rows, X=feats.reshape(-1, feats.shape[-1]), y=y.reshape(-1),
                group=((gi * docs_per_batch + doc) * 10_000 + o).reshape(-1),
                position=np.full(cand.numel(), o), logp=raw_lp.gather(1, cand).reshape(-1),
                is_human=(cand == human[:, None]).reshape(-1),
            )  # fmt: skip
        return rows

    desc = f"entcal train: labels round {round_index}"
    return _chunked_labels(groups, folder, "group", desc, progress, compute)


@torch.inference_mode()
def collect_alpha_rows(model, pairs, positions_per_pair: int, seed: int, salt: int = 0):
    """Raw log-probs at human positions (teacher forced): ``(logprobs (N, V), targets, position)``."""
    device = model.get_output_embeddings().weight.device
    lps, targets, positions = [], [], []
    for i, pair in enumerate(pairs):
        gen = _generator(seed, 99 + salt, i)
        ids = torch.tensor(list(pair.prompt_ids) + list(pair.continuation_ids), device=device)
        n_prompt = len(pair.prompt_ids)
        offs = torch.tensor(
            sorted(_offsets(len(pair.continuation_ids), positions_per_pair, gen)), device=device
        )
        logits = model(input_ids=ids[None, :-1]).logits[0]
        rows = logits[n_prompt - 1 + offs].float()
        lps.append(torch.log_softmax(rows, dim=-1))
        targets.append(ids[n_prompt + offs])
        positions.append(offs)
    return torch.cat(lps), torch.cat(targets), torch.cat(positions)


def _cached_rows(path: Path, compute):
    """Human-position rows, computed once and kept in ``path`` (so a resumed run skips them)."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        data = load_file(str(path))
        return data["logprobs"], data["targets"], data["position"]
    lp, targets, position = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {"logprobs": lp.contiguous(), "targets": targets.contiguous(), "position": position},
        str(tmp),
    )
    tmp.replace(path)
    return lp, targets, position


def _phi(pred: FutureEntropyPredictor, logprobs, position, chunk: int = 256) -> torch.Tensor:
    return torch.cat(
        [
            pred.phi(logprobs[s : s + chunk], position[s : s + chunk])
            for s in range(0, logprobs.shape[0], chunk)
        ]
    )


def _alpha_summary(single: AlphaFit, buckets: AlphaFit) -> dict[str, Any]:
    return {
        "global": single.alpha[0],
        "bucket_edges": buckets.bucket_edges,
        "bucket_values": buckets.alpha,
        "fit_global": single.to_json(),
        "fit_buckets": buckets.to_json(),
    }


def _make_adjust(pred: FutureEntropyPredictor):
    def adjust(logprobs, position):
        alpha = pred.alpha_for(position)
        return pred.adjusted(logprobs, position, alpha)

    return adjust


def _heldout_logloss(pred, lp, targets, position) -> dict[str, float]:
    from entcal.calibrators.alpha import logloss_terms

    phi = _phi(pred, lp, position)
    zero = logloss_terms(lp, phi, targets, torch.zeros(len(targets)))[0].mean()
    alpha = pred.alpha_for(position)
    single = torch.full_like(alpha, float(pred.meta_["alpha"]["global"]))
    return {
        "n_positions": len(targets),
        "raw": float(zero),
        "alpha_global": float(logloss_terms(lp, phi, targets, single)[0].mean()),
        "alpha_buckets": float(logloss_terms(lp, phi, targets, alpha)[0].mean()),
    }


def train_predictor(
    cfg: TrainConfig, out: str | Path, model=None, tokenizer=None, progress: bool = True
) -> dict[str, Any]:
    """Run the whole recipe; writes ``OUT/predictor/`` and ``OUT/report.json``; returns the report."""
    from entcal import corpora, models

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = dataclasses.asdict(cfg)
    cfg_path = out / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(cfg_json)):
        raise ValueError(
            f"{out} holds a run with a different configuration ({cfg_path}); "
            "use a new --out folder to train with other settings"
        )
    cfg_path.write_text(json.dumps(cfg_json, indent=2))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if model is None:
        model, tokenizer = models.load(cfg.model)
    corpus = corpora.load_corpus(cfg.corpus)
    n_needed = cfg.label_pairs + cfg.refit_rounds * cfg.refit_pairs + cfg.alpha_pairs
    pairs = corpora.make_pairs(
        corpus.split("train"),
        tokenizer,
        prompt_tokens=cfg.prompt_tokens,
        continuation_tokens=cfg.continuation_tokens,
        n=n_needed,
        seed=cfg.seed,
    )
    if len(pairs) < n_needed:
        raise ValueError(
            f"the training split yields {len(pairs)} documents of {cfg.prompt_tokens}+"
            f"{cfg.continuation_tokens} tokens; the config needs {n_needed}"
        )
    alpha_pairs = pairs[: cfg.alpha_pairs]
    label_sets = [pairs[cfg.alpha_pairs : cfg.alpha_pairs + cfg.label_pairs]]
    start = cfg.alpha_pairs + cfg.label_pairs
    for _ in range(cfg.refit_rounds):
        label_sets.append(pairs[start : start + cfg.refit_pairs])
        start += cfg.refit_pairs
    test_pairs = []
    if cfg.test_pairs:
        test_pairs = corpora.make_pairs(
            corpus.split("test"),
            tokenizer,
            prompt_tokens=cfg.prompt_tokens,
            continuation_tokens=cfg.continuation_tokens,
            n=cfg.test_pairs,
            seed=cfg.seed,
        )

    table = token_table(model.get_output_embeddings().weight, cfg.table_dim)
    fp = predictor_fingerprint(model, cfg.model)
    lp_a, y_a, pos_a = _cached_rows(
        out / "data" / "alpha_rows.safetensors",
        lambda: collect_alpha_rows(model, alpha_pairs, cfg.alpha_positions_per_pair, cfg.seed),
    )
    test = None
    if test_pairs:
        test = _cached_rows(
            out / "data" / "test_rows.safetensors",
            lambda: collect_alpha_rows(
                model, test_pairs, cfg.alpha_positions_per_pair, cfg.seed, salt=1
            ),
        )
    report: dict[str, Any] = {"config": cfg_json, "fingerprint": fp, "rounds": []}
    adjust = None
    pred = None
    rounds_data: list[dict[str, np.ndarray]] = []
    for r, label_pairs in enumerate(label_sets):
        collect = collect_rollout_labels if cfg.horizon > 1 else collect_labels
        data = collect(
            model, label_pairs, cfg, table, out / "data" / f"round{r}", r, adjust, progress
        )
        # Refit rounds fit on every label so far (round r's labels come from the adjusted model
        # of round r-1; earlier rounds' keep the data set from shrinking to one round's).
        rounds_data.append({**data, "group": data["group"] + r * 100_000_000})
        fit_data = {k: np.concatenate([d[k] for d in rounds_data]) for k in ("X", "y", "group")}
        pred = FutureEntropyPredictor(estimator=cfg.estimator, random_state=cfg.seed)
        pred.fit(fit_data["X"], fit_data["y"], fit_data["group"])
        pred.table_ = table
        phi = _phi(pred, lp_a, pos_a)
        single = fit_alpha(lp_a, phi, y_a)
        buckets = fit_alpha(lp_a, phi, y_a, pos_a, cfg.bucket_edges)
        pred.meta_ = {
            "alpha": _alpha_summary(single, buckets),
            "horizon": cfg.horizon,
            "round": r,
            "train_config": cfg_json,
        }
        entry: dict[str, Any] = {
            "round": r,
            "labels_from": "raw model" if r == 0 else f"adjusted model of round {r - 1}",
            "n_labels": len(data["y"]),
            "n_labels_fitted": len(fit_data["y"]),
            "label_mean": float(data["y"].mean()),
            "label_std": float(data["y"].std()),
            "predictor": pred.scores_,
            "alpha_global": single.alpha[0],
            "alpha_buckets": buckets.alpha,
            "alpha_fit_logloss": {
                "raw": single.total_loss(False),
                "alpha_global": single.total_loss(True),
                "alpha_buckets": buckets.total_loss(True),
            },
        }
        # The decoder's default α: per bucket only where that wins on held-out human text
        # (buckets always win in-sample; with few rows per bucket they may overfit).
        pred.meta_["alpha"]["default"] = "global"
        if test is not None:
            entry["test_logloss"] = _heldout_logloss(pred, *test)
            if entry["test_logloss"]["alpha_buckets"] < entry["test_logloss"]["alpha_global"]:
                pred.meta_["alpha"]["default"] = "buckets"
        entry["alpha_default"] = pred.meta_["alpha"]["default"]
        report["rounds"].append(entry)
        adjust = _make_adjust(pred)
    assert pred is not None
    report["seconds"] = round(time.time() - t0, 1)
    pred.meta_["report"] = report["rounds"]
    pred.save(out / "predictor", fingerprint=fp)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report
