"""entcal.eval: entropy calibration, typical-set (AEP) checks, detectability, diversity, reports.

* :mod:`entcal.eval.scoring`: batched teacher-forced scoring (entropy, varentropy, log-prob, rank
  under the raw model and under decoders' processed distributions);
* :mod:`entcal.eval.calibration`: EntCE, per-step curves, entropy slope, standard errors;
* :mod:`entcal.eval.typical`: the AEP / typical-set statistics;
* :mod:`entcal.eval.detect`: zero-shot detectors, AUROC, TPR at a fixed FPR;
* :mod:`entcal.eval.diversity`: distinct-n, self-BLEU, Zipf, repetition, MAUVE (optional);
* :mod:`entcal.eval.compare` / :mod:`entcal.eval.report`: ``entcal compare``.

The structural studies (list-decoding branching, information emergence) are in
:mod:`entcal.studies`.

Submodules are imported on use (``from entcal.eval import calibration``); nothing heavy is
imported here.
"""

from __future__ import annotations

__all__ = [
    "calibration",
    "compare",
    "detect",
    "diversity",
    "report",
    "scoring",
    "typical",
]
