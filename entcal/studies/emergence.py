"""Information emergence (IE) of transformer blocks, after Chen et al. (arXiv 2405.12617).

Chen, Yang, Zhu & Wang treat the representations passed between transformer blocks as a Markov
process (block l maps h_l to h_{l+1}) and compare how much a block's output tells about its input
at the *macro* level (the last token of a whole sequence, which aggregates the context) with the
*micro* level (each token fed alone, with no context):

    IE(l) = MI(h_{l+1}^macro ; h_l^macro) − (1/T) Σ_t MI(h_{l+1}^micro_t ; h_l^micro_t)

and as a function of position, IE(l, t) = MI(h_{l+1}^t ; h_l^t) − mean_{s ≤ t} MI(micro_s), where
h^t is the state of token t inside the full sequence (the macro variable of the prefix of length
t + 1). IE > 0: the block reduces uncertainty more for the sequence than for its tokens.

How it is computed here:

* block inputs and outputs are captured with forward hooks on the decoder blocks
  (:mod:`entcal.studies.capture`);
* windows: ``n_sequences`` (default 4096) distinct windows of T tokens cut from the sentences
  of human text, split once (seeded) into train / validation / test windows;
* MI is the held-out Donsker–Varadhan bound of a MINE critic (:mod:`entcal.studies.mine`), many
  critics trained at once as one batched network;
* for IE, each state is reduced to ``dim`` (32) whitened principal components fitted on the
  train windows (a projection can only lower MI: the bound stays a lower bound), and
  independent N(0, σ²) noise (σ = ``noise`` = 1) is added to each component, which makes the
  MI of a deterministic block finite (see :func:`information_emergence` for why each choice).

Blocks are deterministic, so the MI between a block's input and output is formally infinite for
continuous states, as the paper's reviewers pointed out; with the noise it is finite but depends
on σ and ``dim``. Compare IE across layers or models only at equal settings.

The report (``entcal emergence``) is :mod:`entcal.studies.emergence_report`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from entcal.studies.capture import capture_block_states, check_layers
from entcal.studies.mine import check_mine_args, split_rows, train_critics, whitener

__all__ = ["EmergenceResult", "information_emergence", "text_windows"]


def text_windows(corpus, tokenizer, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` consecutive tokens of natural text, drawn with ``seed``.

    As in the paper's natural-sentence data (spans that start right after a period and hold no
    newline), windows never cross a sentence or a paragraph: each sentence is cut into
    consecutive, non-overlapping windows from its start (a remainder shorter than ``seq_len`` is
    dropped), and repeated windows are kept once. The first window of a sentence starts it; later
    ones start mid-sentence, as the paper's did (it kept the last 8 tokens of 16-token spans). Long sentences thus give several
    windows, which is what lets the default corpus reach a few thousand windows of 8 tokens.
    """
    import random
    import re

    for name, v, lo in (("n", n, 1), ("seq_len", seq_len, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    docs = corpus.documents if hasattr(corpus, "documents") else list(corpus)
    sentences = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            flat = " ".join(para.split())
            sentences.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if s.strip())
    encoded = tokenizer(sentences, add_special_tokens=False)["input_ids"] if sentences else []
    windows = [
        ids[i : i + seq_len] for ids in encoded for i in range(0, len(ids) - seq_len + 1, seq_len)
    ]
    # Distinct windows only: repeated phrases (boilerplate) give identical states, and a pair of
    # identical macro states on the two sides of a negative pair is what a DV bound is most
    # sensitive to.
    windows = list(dict.fromkeys(tuple(w) for w in windows))
    if len(windows) < n:
        raise ValueError(
            f"the corpus yields only {len(windows)} distinct windows of {seq_len} tokens inside "
            f"sentences; asked for n={n} (lower n or seq_len, or pass a larger corpus)"
        )
    random.Random(seed).shuffle(windows)
    return torch.tensor(windows[:n], dtype=torch.long)


def _bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer adds one (Gemma degenerates without it), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


@dataclasses.dataclass
class EmergenceResult:
    """IE per block (and optionally per position), with the MI terms it is made of (nats).

    Every value is a held-out DV bound on the ``n_test`` test windows; ``*_se`` are their
    standard errors over those windows (first-order expansion; the spread over training seeds
    is not included).

    Attributes:
        layers: block indices; ``ie[i]``, ``mi_macro[i]``, ``mi_micro[i]`` belong to ``layers[i]``.
        mi_micro_positions: per block, MI(micro_t) for t = 0..T−1 (``mi_micro`` is their mean).
        mi_context_positions: per block, MI of the in-context state at position t (only with
            ``positions=True``; its last entry is the macro MI).
        ie_positions: per block, IE(l, t) = MI_context(t) − mean_{s ≤ t} MI_micro(s).
    """

    model: str
    layers: list[int]
    ie: list[float]
    ie_se: list[float]
    mi_macro: list[float]
    mi_macro_se: list[float]
    mi_micro: list[float]
    mi_micro_se: list[float]
    mi_micro_positions: list[list[float]]
    mi_context_positions: list[list[float]] | None
    ie_positions: list[list[float]] | None
    ie_positions_se: list[list[float]] | None
    n_sequences: int
    n_test: int
    seq_len: int
    dim: int | None
    noise: float
    bos: bool
    seed: int
    mine: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _se(psi: torch.Tensor) -> list[float]:
    """Standard errors from influence values (..., n)."""
    return (psi.std(-1) / math.sqrt(psi.shape[-1])).reshape(-1).tolist()


@torch.inference_mode()
def information_emergence(
    model,
    tokenizer,
    corpus=None,
    *,
    layers: Sequence[int] | None = None,
    n_sequences: int = 4096,
    seq_len: int = 8,
    dim: int | None = 32,
    noise: float = 1.0,
    positions: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    chunk: int = 128,
    seed: int = 0,
    progress: bool = False,
    **mine,
) -> EmergenceResult:
    """IE(l) of the chosen blocks on ``n_sequences`` distinct windows of ``seq_len`` tokens.

    Each MI is the held-out DV bound of a MINE critic (see :func:`estimate_mi`), with these
    choices, made so that the numbers are finite, stable and reproducible on a few thousand
    windows (the paper used 300k sequences and reported the maximum bound seen in training):

    * **Split by window.** The windows are split once (``seed``) into train / validation / test;
      every critic trains on the train windows, is selected on the validation windows and is
      evaluated on the same test windows, so the IE's standard error can account for the
      correlation of its macro and micro terms (from their per-window influence values).
    * **Reduction.** Each variable (block input or output; macro, or micro pooled over
      positions) is z-scored and projected on its top ``dim`` principal components, whitened,
      fitted on the train windows. A function of a variable can only lower its MI with another
      (data processing), so the bound stays a lower bound (of the MI of the projections); a
      critic on 32 inputs trains in seconds and does not overfit 576-dim states.
    * **Noise.** Blocks are deterministic, so MI(h_{l+1}; h_l) is infinite for continuous states
      and a DV estimate of it only measures the estimator (its capacity, the sample size): the
      bound is dominated by a few near-identical windows (same last tokens) and moved by
      several nats between seeds. With ``noise`` σ > 0 the MI measured is that of the whitened
      projections plus independent N(0, σ²) noise on each component (input and output alike;
      fresh draws in training, one seeded draw per held-out row), as in Goldfeld et al. (2019,
      "Estimating information flow in deep neural networks"): finite, at most
      (dim/2)·log(1 + 1/σ²) nats whatever the states' distribution (the capacity of a Gaussian
      channel with unit power per component; 11.1 nats at the defaults), and in the range
      where the estimator is accurate on Gaussians. ``noise=0`` gives the noise-free
      variant.
    * **Micro critic shared across positions.** Micro states depend only on the token, so one
      critic per block is trained on the micro pairs of all positions and evaluated on each
      position's test rows: each is still a valid lower bound of MI(micro_t), at 1/T of the cost.

    Values depend on ``dim``, ``noise`` and the MINE settings: compare IE across layers or
    models only at equal settings.

    Args:
        model, tokenizer: from :func:`entcal.models.load`.
        corpus: human text (default: :func:`entcal.corpora.load_corpus`).
        layers: block indices (default all); an index beyond the model is a ``ValueError``.
        n_sequences, seq_len: windows (samples of each MI), and T.
        dim: principal components kept per state (``None``: all coordinates).
        noise: σ of the Gaussian noise added to each whitened component (0: none).
        positions: also estimate the in-context MI at every position (IE vs position; one
            critic per block and position).
        val_fraction, test_fraction: shares of the windows held out.
        chunk: sequences per forward pass.
        seed: window sampling, split, noise and MINE seed: same arguments, same numbers.
        progress: tqdm bars.
        **mine: MINE settings as in :func:`estimate_mi`: steps (600), batch_size (512),
            hidden (64), embed (32), lr (3e-3), eval_every (50).
    """
    from entcal.corpora import load_corpus

    layers = check_layers(model, layers)
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise ValueError(f"dim must be None or an integer >= 1, got {dim!r}")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 100:
        raise ValueError(f"n_sequences must be an integer >= 100, got {n_sequences!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    unknown = set(mine) - {"hidden", "embed", "steps", "batch_size", "lr", "eval_every"}
    if unknown:
        raise ValueError(f"unknown MINE settings {sorted(unknown)}")
    mine = {
        "hidden": 64,
        "embed": 32,
        "steps": 600,
        "batch_size": 512,
        "lr": 3e-3,
        "eval_every": 50,
        **mine,
    }
    check_mine_args(dim=dim, **mine)
    corpus = load_corpus() if corpus is None else corpus
    windows = text_windows(corpus, tokenizer, n_sequences, seq_len, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train, val, test = split_rows(n_sequences, val_fraction, test_fraction, g)
    bos = _bos_id(tokenizer)
    device = next(model.parameters()).device
    off = 1 if bos is not None else 0
    keep_pos = list(range(seq_len)) if positions else [seq_len - 1]
    T, P = seq_len, len(keep_pos)

    # Context states, float16 on the CPU (block states are O(10²) at most; the projections
    # are fitted on them afterwards, on the train windows).
    ctx_in = {layer: [] for layer in layers}
    ctx_out = {layer: [] for layer in layers}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=math.ceil(n_sequences / chunk) + 1, desc="entcal emergence: states")
    for start in range(0, n_sequences, chunk):
        ids = windows[start : start + chunk]
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=torch.long), ids], dim=1)
        ins, outs = capture_block_states(model, ids.to(device), layers)
        for layer in layers:
            pos = [off + t for t in keep_pos]  # BOS dropped
            ctx_in[layer].append(ins[layer][:, pos].cpu().half())
            ctx_out[layer].append(outs[layer][:, pos].cpu().half())
        if bar is not None:
            bar.update(1)
    # Micro: each distinct token alone (after BOS where the model needs it); the states of
    # equal tokens are equal, so one forward per distinct token suffices.
    uniq, inverse = windows.unique(return_inverse=True)
    micro_ids = uniq[:, None]
    if bos is not None:
        micro_ids = torch.cat([torch.full_like(micro_ids, bos), micro_ids], dim=1)
    mic_in = {layer: [] for layer in layers}
    mic_out = {layer: [] for layer in layers}
    for start in range(0, micro_ids.shape[0], chunk * seq_len):
        ins, outs = capture_block_states(
            model, micro_ids[start : start + chunk * seq_len].to(device), layers
        )
        for layer in layers:
            mic_in[layer].append(ins[layer][:, -1].cpu())
            mic_out[layer].append(outs[layer][:, -1].cpu())
    if bar is not None:
        bar.update(1)
        bar.close()

    # Micro rows pooled over positions, window-major: row w·T + t is token t of window w.
    def rows(w: torch.Tensor) -> torch.Tensor:
        r = (w[:, None] * T + torch.arange(T)).reshape(-1)
        return r[torch.randperm(r.numel(), generator=g)]

    m_train, m_val = rows(train), rows(val)
    m_tests = [test * T + t for t in range(T)]
    tok_of_row = inverse.reshape(-1)
    fit_w = train[:4096]  # PCA fitting rows: a random subset (train is shuffled) suffices
    fit_r = m_train[:4096]
    with torch.inference_mode(False):
        # Reduce every variable to dim whitened components, fitted on train windows; the micro
        # table (one row per distinct token) is reduced once, then expanded to rows.
        cx, cy, mx, my = [], [], [], []
        for layer in layers:
            a = torch.cat(ctx_in.pop(layer)).float()
            b = torch.cat(ctx_out.pop(layer)).float()
            for j in range(P):
                cx.append(whitener(a[fit_w, j][None], dim)(a[:, j][None])[0])
                cy.append(whitener(b[fit_w, j][None], dim)(b[:, j][None])[0])
            a, b = torch.cat(mic_in[layer]), torch.cat(mic_out[layer])
            mx.append(whitener(a[None, tok_of_row[fit_r]], dim)(a[None])[0][tok_of_row])
            my.append(whitener(b[None, tok_of_row[fit_r]], dim)(b[None])[0][tok_of_row])
        settings = dict(g=g, dim=None, noise=float(noise), **mine)
        [(ctx_dv, ctx_psi)] = train_critics(
            torch.stack(cx), torch.stack(cy), train, val, [test], **settings
        )
        micro = train_critics(torch.stack(mx), torch.stack(my), m_train, m_val, m_tests, **settings)
    ctx_dv = ctx_dv.view(len(layers), P)
    ctx_psi = ctx_psi.view(len(layers), P, -1)
    mic_dv = torch.stack([d for d, _ in micro], 1)  # (L, T)
    mic_psi = torch.stack([p for _, p in micro], 1)  # (L, T, n_test)

    macro_dv, macro_psi = ctx_dv[:, -1], ctx_psi[:, -1]
    micro_mean, micro_psi = mic_dv.mean(1), mic_psi.mean(1)
    ie = macro_dv - micro_mean
    ie_psi = macro_psi - micro_psi
    ie_pos = ie_pos_se = ctx_pos = None
    if positions:
        ctx_pos = ctx_dv.tolist()
        # IE(l, t) = MI_ctx(t) − mean_{s ≤ t} MI_micro(s), with its influence values.
        cum = torch.arange(1, T + 1)
        run_dv = mic_dv.cumsum(1) / cum
        run_psi = mic_psi.cumsum(1) / cum[:, None]
        ie_pos = (ctx_dv - run_dv).tolist()
        ie_pos_se = [_se(ctx_psi[i] - run_psi[i]) for i in range(len(layers))]
    return EmergenceResult(
        model=str(getattr(model, "name_or_path", type(model).__name__)),
        layers=layers,
        ie=ie.tolist(),
        ie_se=_se(ie_psi),
        mi_macro=macro_dv.tolist(),
        mi_macro_se=_se(macro_psi),
        mi_micro=micro_mean.tolist(),
        mi_micro_se=_se(micro_psi),
        mi_micro_positions=mic_dv.tolist(),
        mi_context_positions=ctx_pos,
        ie_positions=ie_pos,
        ie_positions_se=ie_pos_se,
        n_sequences=n_sequences,
        n_test=int(test.numel()),
        seq_len=seq_len,
        dim=dim,
        noise=float(noise),
        bos=bos is not None,
        seed=seed,
        mine=mine,
    )
