"""The metrics section of ``entcal compare``: from the generations and their teacher-forced
scores to the results document (EntCE, AEP, detectability, diversity per decoder, and the human
text's own figures). Metric math lives in the metric modules; this only assembles it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from entcal.eval import calibration, detect, diversity, typical

__all__ = ["SCHEMA_VERSION", "results_document"]

#: Version of the results.json layout.
SCHEMA_VERSION = 1


def _decode(tokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except Exception:  # a tokenizer that cannot decode: ids are still informative
        return " ".join(map(str, ids))


def results_document(
    config, corpus_name, ident, tokenizer, prompts, human, decoders, generations, scores
) -> dict:
    hs = scores["human"]
    mask_h = hs.mask
    human_ll, human_ll_se = calibration.weighted_mean(-hs.raw.logprob.double(), mask_h)
    h_steps, _, _ = calibration.per_step_mean(-hs.raw.logprob.double(), mask_h)
    human_raw_entropy, _ = calibration.weighted_mean(hs.raw.entropy.double(), mask_h)
    human_det = detect.detector_scores(
        hs.raw.logprob, hs.raw.entropy, hs.raw.varentropy, mask_h, hs.raw.rank,
        hs.observer_cross_entropy,
    )  # fmt: skip
    human_aep = typical.aep(
        hs.raw.logprob, hs.raw.entropy, hs.raw.varentropy, mask_h, epsilon=config.epsilon
    )
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": config.model,
        "model_info": {
            "type": ident["type"],
            "vocab_size": ident["vocab"],
            "params": ident["params"],
        },
        "corpus": corpus_name,
        "n": len(prompts),
        "length": config.length,
        "prompt_tokens": config.prompt_tokens,
        "samples": config.samples,
        "split": config.split,
        "seed": config.seed,
        "observer": config.observer,
        "epsilon": config.epsilon,
        "human": {
            "log_loss": human_ll,
            "log_loss_se": human_ll_se,
            "log_loss_per_step": h_steps.tolist(),
            "raw_entropy": human_raw_entropy,
            "aep": human_aep.to_dict(per_text=False),
            "diversity": diversity.diversity(human),
        },
        "decoders": {},
    }
    for spec in decoders:
        gen = generations[spec]
        gs = scores[spec]
        g_mask = torch.ones_like(gen["tokens"], dtype=torch.bool)
        cal = calibration.entropy_calibration(
            gen["entropy"], g_mask, hs.processed[spec].logprob, mask_h, hs.raw.logprob,
            samples_per_prompt=config.samples,
        )  # fmt: skip
        aep_q = typical.aep(
            gen["logprob"], gen["entropy"], gen["varentropy"], g_mask, epsilon=config.epsilon
        )
        aep_raw = typical.aep(
            gs.raw.logprob, gs.raw.entropy, gs.raw.varentropy, gs.mask, epsilon=config.epsilon
        )
        gen_det = detect.detector_scores(
            gs.raw.logprob, gs.raw.entropy, gs.raw.varentropy, gs.mask, gs.raw.rank,
            gs.observer_cross_entropy,
        )  # fmt: skip
        det = {
            name: {
                "auroc": detect.auroc(human_det[name], gen_det[name]),
                "tpr_at_1fpr": detect.tpr_at_fpr(human_det[name], gen_det[name], 0.01),
                "human_mean": float(np.nanmean(human_det[name])),
                "generated_mean": float(np.nanmean(gen_det[name])),
            }
            for name in gen_det
        }
        toks = gen["tokens"].tolist()
        div = diversity.diversity(toks)
        if hs.features is not None and gs.features is not None:
            div["mauve"] = diversity.mauve_score(hs.features.numpy(), gs.features.numpy())
        raw_ent, _ = calibration.weighted_mean(gen["raw_entropy"].double(), g_mask)
        # None when the engine did not report the raw log-probs of its tokens (nothing to check)
        consistency = (
            float((gen["raw_logprob"] - gs.raw.logprob).abs().max())
            if "raw_logprob" in gen
            else None
        )
        # sampled tokens the decoder's own distribution excludes: 0 when the decoder was the one
        # sampling (an engine that left a row unprocessed shows here)
        outside = float((~torch.isfinite(gen["logprob"])).double().mean())
        entry = cal.to_dict()
        entry.update(
            {
                "gen_raw_entropy": raw_ent,
                "aep": aep_q.to_dict(per_text=False),
                "aep_raw": aep_raw.to_dict(per_text=False),
                "detect": det,
                "diversity": div,
                "check": {
                    "max_abs_raw_logprob_diff_generate_vs_score": consistency,
                    "tokens_outside_decoder": outside,
                },
                "sample": _decode(tokenizer, toks[0][:80]) if toks else "",
            }
        )
        results["decoders"][spec] = entry
    return results
