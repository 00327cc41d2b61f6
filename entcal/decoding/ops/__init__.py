"""Pure batched sampling ops (vLLM style): one function per rule, per-row parameters.

Every ``*_mask`` function takes float32 logits ``[N, V]`` (masked tokens at ``-inf``) and per-row
parameters (a Python number, broadcast to all rows, or a tensor ``[N]``) and returns a boolean
``[N, V]`` mask of the tokens to **remove** (``True`` = removed), like the ``indices_to_remove`` of
transformers' warpers; apply it with ``logits.masked_fill(mask, -inf)``. A row whose parameter is
the neutral value (``top_p=1``, ``top_k=0``, ``min_p=0``, ``typical=1``, ``epsilon=0``,
``eta=0``, ``n_sigma=inf``) is left untouched, so one call serves a batch that mixes settings.

Exactness. For temperature, top-k, top-p, min-p, epsilon and eta the kept set equals
transformers' warper on the same tensor (differentially tested on thousands of random batches).
top-p avoids transformers' full-vocabulary sort: it gathers the blocks of tokens near the top of
the row, builds a float64 histogram of their mass over 1/64-nat buckets and sorts only the few
tokens of the bucket where the cumulative mass crosses ``top_p``. A row is decided that way only
when the cumulative mass at the boundary clears the threshold by a margin (``EXACT_TOL``,
``NORM_ERR``) larger than transformers' own float32 error there and entcal's (4.7x the largest
difference measured between the two, at vocab 49152 and 262144); every other row is recomputed
with transformers' arithmetic (full sort, float32 softmax, cumulative sum). Flat rows (most
blocks near the top) bracket the boundary from a strided sample instead of the histogram. So the
sets agree not only in the common case but also where the boundary is numerically close.
typical uses the same machinery with float64 masses; see :func:`typical_mask` for when and why
it can differ from transformers' float32 rounding.

Ties. When several tokens share the logit (or, for typical, the |surprise - entropy| score) of the
last kept token, all of them are kept: the kept set is ``{v : score(v) >= score of the boundary
token}``, the rule of transformers' TopK. transformers' TopP, MinP (``min_tokens_to_keep``) and
Typical (``min_tokens_to_keep``) keep an arbitrary subset of such a tied group (whatever order
``torch.sort``/``torch.topk`` returns); entcal keeps the whole group, so its set is the smallest
tie-closed superset of theirs. With continuous logits ties have probability zero and the sets are
identical.

All-``-inf`` rows stay all ``-inf`` (nothing is removed, no NaN is produced); NaN is rejected
earlier by :func:`check_logits`.

Layout: :mod:`~entcal.decoding.ops.common` (parameters broadcast to rows, validation, block
reductions), :mod:`~entcal.decoding.ops.thresholds` (temperature, top-k, min-p, epsilon, eta,
top-nσ), :mod:`~entcal.decoding.ops.nucleus` (top-p and typical),
:mod:`~entcal.decoding.ops.adaptive` (mirostat, EDT), :mod:`~entcal.decoding.ops.serving`
(top-H, smoothing, dynamic temperature, XTC, mirostat v1), :mod:`~entcal.decoding.ops.entropy`
(entropy and varentropy). Import the functions from here.
"""

from __future__ import annotations

from entcal.decoding.ops.adaptive import edt_temperature, mirostat_mask
from entcal.decoding.ops.common import (
    check_logits,
    checked_row_max,
    faulty_rows,
    finite_extent,
    keep_dead_rows,
    rows,
)
from entcal.decoding.ops.entropy import entropy_stats, entropy_varentropy
from entcal.decoding.ops.nucleus import EXACT_TOL, NORM_ERR, top_p_mask, typical_mask
from entcal.decoding.ops.serving import (
    dynatemp_temperature,
    mirostat_v1_k,
    quadratic_smoothing,
    top_h_apply,
    top_h_mask,
    xtc_mask,
)
from entcal.decoding.ops.thresholds import (
    epsilon_mask,
    eta_mask,
    min_p_mask,
    temperature,
    top_k_mask,
    top_n_sigma_mask,
)

__all__ = [
    "EXACT_TOL",
    "NORM_ERR",
    "check_logits",
    "checked_row_max",
    "dynatemp_temperature",
    "edt_temperature",
    "entropy_stats",
    "entropy_varentropy",
    "epsilon_mask",
    "eta_mask",
    "faulty_rows",
    "finite_extent",
    "keep_dead_rows",
    "min_p_mask",
    "mirostat_mask",
    "mirostat_v1_k",
    "quadratic_smoothing",
    "rows",
    "temperature",
    "top_h_apply",
    "top_h_mask",
    "top_k_mask",
    "top_n_sigma_mask",
    "top_p_mask",
    "typical_mask",
    "xtc_mask",
]
