"""entcal.eval: entropy calibration, typical-set (AEP) checks, detectability, diversity, reports.

* :mod:`entcal.eval.scoring`: batched teacher-forced scoring (entropy, varentropy, log-prob, rank
  under the raw model and under decoders' processed distributions), running the model through
  :mod:`entcal.eval.model_runner`; its data types (``TokenStats``, ``TextScores``,
  ``ScoreRequest``) are in :mod:`entcal.eval.scores`;
* :mod:`entcal.eval.calibration`: EntCE, per-step curves, entropy slope, standard errors;
* :mod:`entcal.eval.typical`: the AEP / typical-set statistics;
* :mod:`entcal.eval.detect`: zero-shot detectors, AUROC, TPR at a fixed FPR;
* :mod:`entcal.eval.diversity`: distinct-n, self-BLEU, Zipf, repetition, MAUVE (optional);
* :mod:`entcal.eval.compare` / :mod:`entcal.eval.compare_generation` /
  :mod:`entcal.eval.compare_metrics` / :mod:`entcal.eval.report` /
  :mod:`entcal.eval.results_cache`: ``entcal compare`` (the run, its generation step per engine,
  its results document, report and resumable cache); :mod:`entcal.decoding.vllm.engine` generates for it through ``vllm.LLM``
  (``--engine vllm``) and :mod:`entcal.eval.ray_engine` through Ray Data with a vLLM engine per
  actor (``--engine ray``), writing and reading generations folders (``--from-generations``);
* :mod:`entcal.eval.frontier`: ``entcal frontier``, the calibration–log-loss frontier.

Metric modules take tensors, not models. The package may import :mod:`entcal.models`,
:mod:`entcal.corpora`, :mod:`entcal.decoding`, :mod:`entcal.generation` and
:mod:`entcal.calibrators`; :mod:`entcal.studies` and :mod:`entcal.commands` import it.

The structural studies (list-decoding branching, information emergence) are in
:mod:`entcal.studies`.

Submodules are imported on use (``from entcal.eval import calibration``); nothing heavy is
imported here.
"""

from __future__ import annotations

__all__ = [
    "calibration",
    "compare",
    "compare_generation",
    "compare_metrics",
    "detect",
    "diversity",
    "frontier",
    "model_runner",
    "ray_engine",
    "report",
    "results_cache",
    "scores",
    "scoring",
    "typical",
]
