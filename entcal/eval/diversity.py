"""Diversity of a set of texts, over the model's token ids (tokenizer-consistent; no word
tokenizer is needed).

* ``distinct_n``: corpus-level ``|unique n-grams| / |n-grams|`` (Li et al., NAACL 2016) — the
  set size, not the hapax count some implementations use;
* ``self_bleu``: mean over texts of BLEU-4 (uniform weights, NLTK's ``method1`` smoothing: a zero
  n-gram match count becomes 0.1) with every *other* text as references (Zhu et al., Texygen
  2018); higher means less diverse. Implemented here: clipped counts take, per n-gram, the
  largest count among the other texts (top-2 counts per n-gram, so one pass over the corpus);
* ``zipf``: ``-slope`` of ``log frequency`` against ``log rank`` over the 5000 most frequent
  tokens (Holtzman et al. 2019, ``metrics/zipf.py``);
* ``repetition``: mean over texts of seq-rep-4 ``1 - |unique 4-grams| / |4-grams|`` (Welleck et
  al. 2020);
* ``loop_fraction``: fraction of texts that *end* in a loop: the last ``k`` tokens (``k <= 90``)
  repeat back to back at least twice more for ``k >= 3``, or 50 times for shorter phrases
  (Holtzman et al. 2019, ``metrics/repetition.py``);
* ``mauve``: MAUVE (Pillutla et al. 2021) between two sets of feature vectors, when the optional
  ``mauve-text`` package is installed (``pip install entcal[mauve]``); otherwise ``None``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = [
    "distinct_n",
    "diversity",
    "loop_fraction",
    "mauve_score",
    "repetition",
    "self_bleu",
    "zipf_coefficient",
]

Texts = Sequence[Sequence[int]]


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")


def distinct_n(texts: Texts, n: int = 2) -> float:
    """``|unique n-grams| / |n-grams|`` over all texts (NaN when no text has ``n`` tokens)."""
    _check_n(n)
    grams: Counter = Counter()
    for t in texts:
        grams.update(_ngrams(list(t), n))
    total = sum(grams.values())
    return len(grams) / total if total else math.nan


def repetition(texts: Texts, n: int = 4) -> float:
    """Mean seq-rep-n: ``1 - |unique n-grams| / |n-grams|`` per text (texts shorter than ``n``
    are skipped; NaN when none is long enough)."""
    _check_n(n)
    vals = []
    for t in texts:
        g = _ngrams(list(t), n)
        if g:
            vals.append(1.0 - len(set(g)) / len(g))
    return float(np.mean(vals)) if vals else math.nan


def _ends_in_loop(seq: Sequence[int], max_phrase: int = 90) -> bool:
    seq = list(seq)
    for k in range(1, min(max_phrase, len(seq) // 2) + 1):
        tail = seq[-k:]
        reps, end = 1, len(seq) - k
        while end - k >= 0 and seq[end - k : end] == tail:
            reps += 1
            end -= k
        if (k >= 3 and reps >= 3) or reps >= 50:
            return True
    return False


def loop_fraction(texts: Texts) -> float:
    """Fraction of texts that end in a repetition loop (see the module docstring)."""
    if not texts:
        return math.nan
    return float(np.mean([_ends_in_loop(t) for t in texts]))


def zipf_coefficient(texts: Texts, top: int = 5000) -> float:
    """``-slope`` of the least-squares line of log frequency on log rank (top ``top`` tokens)."""
    from scipy import stats

    counts: Counter = Counter()
    for t in texts:
        counts.update(t)
    freq = np.array(sorted(counts.values(), reverse=True)[:top], dtype=np.float64)
    if freq.size < 2:
        return math.nan
    ranks = np.arange(1, freq.size + 1, dtype=np.float64)
    fit = stats.linregress(np.log(ranks), np.log(freq))
    return float(-fit.slope)


def self_bleu(texts: Texts, max_n: int = 4, max_texts: int = 500) -> float:
    """Mean BLEU-``max_n`` of each text against all others (see the module docstring).

    Only the first ``max_texts`` texts are used (Texygen's "fast" mode uses 500). NaN for fewer
    than two texts.
    """
    _check_n(max_n)
    texts = [list(t) for t in texts[:max_texts]]
    if len(texts) < 2:
        return math.nan
    per_text = [[Counter(_ngrams(t, n)) for n in range(1, max_n + 1)] for t in texts]
    # Per n-gram: the largest count, which text holds it, and the second largest, so that the
    # largest count among the *other* texts is known in O(1).
    tops = []
    for n in range(max_n):
        best: dict[tuple[int, ...], list[int]] = {}
        for i, counts in enumerate(per_text):
            for g, c in counts[n].items():
                rec = best.get(g)
                if rec is None:
                    best[g] = [c, i, 0]
                elif c > rec[0]:
                    best[g] = [c, i, rec[0]]
                elif c > rec[2]:
                    rec[2] = c
        tops.append(best)
    lengths = np.array([len(t) for t in texts])
    scores = []
    for i, t in enumerate(texts):
        c = len(t)
        if c == 0:
            scores.append(0.0)
            continue
        log_p = 0.0
        for n in range(max_n):
            counts = per_text[i][n]
            denom = max(1, sum(counts.values()))
            match = 0
            for g, k in counts.items():
                top, who, second = tops[n][g]
                ref = second if who == i else top
                match += min(k, ref)
            if n == 0 and match == 0:
                log_p = -math.inf
                break
            # NLTK method1: a zero count is replaced by epsilon = 0.1.
            log_p += math.log((match if match > 0 else 0.1) / denom) / max_n
        if log_p == -math.inf:
            scores.append(0.0)
            continue
        others = np.delete(lengths, i)
        r = int(others[np.lexsort((others, np.abs(others - c)))][0])  # closest, shorter on ties
        bp = 1.0 if c > r else math.exp(1.0 - r / c)
        scores.append(bp * math.exp(log_p))
    return float(np.mean(scores))


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 25) -> float | None:
    """MAUVE between two feature sets ``[n, d]`` (needs ``mauve-text``; else ``None``)."""
    try:
        import mauve  # type: ignore[import-not-found]
    except ImportError:
        return None
    p = np.asarray(p_features, dtype=np.float32)
    q = np.asarray(q_features, dtype=np.float32)
    out = mauve.compute_mauve(
        p_features=p,
        q_features=q,
        num_buckets=max(2, min(len(p), len(q)) // 10),
        seed=seed,
        verbose=False,
    )
    return float(out.mauve)


def diversity(texts: Texts) -> dict[str, float]:
    """All token-level diversity numbers of a set of texts."""
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "self_bleu": self_bleu(texts),
        "zipf": zipf_coefficient(texts),
        "repetition": repetition(texts),
        "loop_fraction": loop_fraction(texts),
    }
