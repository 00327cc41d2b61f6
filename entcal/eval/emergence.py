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

* block inputs and outputs are captured with forward hooks on the decoder blocks (a pre-hook for
  the input, a hook for the output). The authors' Gemma/OpenLlama samplers saved the *input* as
  the "output" (a variable that still pointed at the layer input); the tests check that the
  captured output differs from the input and equals the next block's input;
* states are reduced to ``dim`` principal components (per block and side, fitted on the first
  chunk of macro states after z-scoring each coordinate, then applied to every state, micro ones
  included). The paper used raw 768-dim slices of 300k sequences: far beyond a CPU budget;
* MI is estimated by a MINE critic trained on the Donsker–Varadhan bound (Belghazi et al. 2018):

      I(X; Y) ≥ E_P[T(x, y)] − log E_{P_X ⊗ P_Y}[e^{T(x, y)}],

  with a separable critic T(x, y) = f(x)ᵀ g(y) (f, g: two-layer MLPs with a linear skip), so
  every minibatch uses all B(B − 1) shuffled pairs as negatives in one matrix product. The data
  are split train / validation / test; training stops at the best validation bound and the
  *test* bound is returned (the paper reported the maximum over training, which is biased up).
  Many estimates train at once as one batched network (``torch.bmm``).

Blocks are deterministic, so the MI between a block's input and output is formally infinite for
continuous states; like the paper's, these values depend on the estimator (its capacity, ``dim``,
the sample size), as its reviewers pointed out. Compare IE across layers or models only at equal
settings.

Example::

    >>> import torch
    >>> from entcal.eval.emergence import estimate_mi
    >>> x = torch.randn(10000, 2); y = 0.8 * x + 0.6 * torch.randn(10000, 2)
    >>> estimate_mi(x, y)   # analytic: -log(1 - 0.64) = 1.02 nats
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

__all__ = [
    "EmergenceResult",
    "capture_block_states",
    "check_layers",
    "decoder_blocks",
    "estimate_mi",
    "estimate_mi_many",
    "information_emergence",
    "text_windows",
    "write_report",
]


# --------------------------------------------------------------------------- MINE


def _lin(E: int, a: int, b: int, g: torch.Generator, zero: bool = False) -> list[torch.Tensor]:
    w = torch.zeros(E, a, b) if zero else torch.randn(E, a, b, generator=g) * math.sqrt(1.0 / a)
    return [w.requires_grad_(), torch.zeros(E, 1, b, requires_grad=True)]


class _Critic:
    """E independent embedding nets h(x) = W3 σ(W2 σ(W1 x)) + W0 x, evaluated with bmm.

    With ``zero_out`` the output layers (W3 and the skip W0) start at zero, so h ≡ 0.
    """

    def __init__(
        self, E: int, din: int, hidden: int, embed: int, g: torch.Generator, zero_out: bool
    ):
        self.layers = [
            _lin(E, din, hidden, g),
            _lin(E, hidden, hidden, g),
            _lin(E, hidden, embed, g, zero_out),
        ]
        self.skip = _lin(E, din, embed, g, zero_out)

    def params(self) -> list[torch.Tensor]:
        return [p for layer in [*self.layers, self.skip] for p in layer]

    def __call__(self, x: torch.Tensor, sel: slice = slice(None)) -> torch.Tensor:
        h = x
        for i, (w, b) in enumerate(self.layers):
            h = torch.baddbmm(b[sel], h, w[sel])
            if i < len(self.layers) - 1:
                h = torch.nn.functional.silu(h)
        return h + torch.baddbmm(self.skip[1][sel], x, self.skip[0][sel])


# Critic scores are clipped to [−CAP, CAP] nats. Any bounded critic still gives a valid DV
# bound; the clip bounds how far one pair can move it. Without it, a critic that has grown
# over-confident on a rare training state (scores of 25 seen for a token seen once) meets two
# copies of that state among the held-out rows, and the one negative pair between them drags
# the held-out bound to −9 nats. e^10 among ~10⁶ negative pairs moves the bound by ~0.03.
_SCORE_CAP = 10.0


def _scores(fx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """(E, B, B) critic scores s[e, i, j] = T(x_i, y_j) = clip(f(x_i)ᵀ g(y_j))."""
    return (fx @ gy.transpose(1, 2)).clamp(-_SCORE_CAP, _SCORE_CAP)


def _dv(fx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Donsker–Varadhan bound per critic: mean diagonal − log mean exp of off-diagonal scores."""
    s = _scores(fx, gy)
    B = s.shape[-1]
    joint = s.diagonal(dim1=1, dim2=2).mean(-1)
    off = s.masked_fill(torch.eye(B, dtype=torch.bool, device=s.device), -math.inf)
    return joint - (torch.logsumexp(off.flatten(1), -1) - math.log(B * (B - 1)))


def _dv_influence(fx: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DV bound per critic and its per-sample influence values (for a standard error).

    DV = A − log B with A = mean_i T(x_i, y_i) and B = mean_{i≠j} e^{T(x_i, y_j)}, a U-statistic
    of order 2. Its Hoeffding projection gives B − B₀ ≈ (2/n) Σ_i (h_i − B), h_i = ½(mean_j
    e^{T(x_i, y_j)} + mean_j e^{T(x_j, y_i)}), so DV − DV₀ ≈ (1/n) Σ_i ψ_i with
    ψ_i = (T(x_i, y_i) − A) − 2 (h_i − B) / B, and SE(DV) ≈ std(ψ) / √n.
    Returns ``(dv (E,), psi (E, n))``.
    """
    s = _scores(fx, gy)
    n = s.shape[-1]
    diag = s.diagonal(dim1=1, dim2=2)
    off = s.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), -math.inf)
    m = off.amax(dim=(1, 2), keepdim=True)  # e^{T − m} cannot overflow
    e = torch.exp(off - m)
    h = 0.5 * (e.sum(2) + e.sum(1)) / (n - 1)
    B = e.sum(dim=(1, 2)) / (n * (n - 1))
    A = diag.mean(-1)
    dv = A - torch.log(B) - m.view(-1)
    psi = (diag - A[:, None]) - 2.0 * (h - B[:, None]) / B[:, None]
    return dv, psi


def _check_xy(x, y, i: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    where = "" if i is None else f" (pair {i})"
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.dim() == 1:
        x = x[:, None]
    if y.dim() == 1:
        y = y[:, None]
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"x and y must be (N, d) tensors{where}, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y need the same number of rows{where}: {x.shape[0]} vs {y.shape[0]}"
        )
    if x.shape[0] < 50:
        raise ValueError(f"MI estimation needs at least 50 samples{where}, got {x.shape[0]}")
    # A copy outside inference mode: the critic's autograd may not see inference tensors.
    with torch.inference_mode(False):
        x = x.detach().float().cpu().clone()
        y = y.detach().float().cpu().clone()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"x and y must be finite (NaN or inf found){where}")
    return x, y


def _pad(ts: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ts])


def _standardize(z: torch.Tensor, fit: torch.Tensor, dim: int | None) -> torch.Tensor:
    """z-score each coordinate and, with ``dim``, project on the top ``dim`` principal axes
    (whitened: unit variance each); all statistics come from the ``fit`` rows only."""
    zf = z[:, fit]
    z = (z - zf.mean(1, keepdim=True)) / (zf.std(1, keepdim=True) + 1e-6)
    if dim is not None and z.shape[-1] > dim:
        zf = z[:, fit]
        cov = zf.transpose(1, 2) @ zf / max(fit.numel() - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals[:, -dim:].flip(-1), evecs[:, :, -dim:].flip(-1)
        z = (z @ evecs) / evals.clamp_min(1e-6).sqrt()[:, None, :]
    return z


def _check_mine_args(**kw) -> None:
    for name in ("hidden", "embed", "steps", "batch_size", "eval_every"):
        v = kw[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    dim = kw["dim"]
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise ValueError(f"dim must be None or an integer >= 1, got {dim!r}")
    if not kw["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {kw['lr']}")


def _split(n: int, val_fraction: float, test_fraction: float, g: torch.Generator):
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < v < 0.5:
            raise ValueError(f"{name} must lie in (0, 0.5), got {v}")
    perm = torch.randperm(n, generator=g)
    n_val, n_test = max(2, int(n * val_fraction)), max(2, int(n * test_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


def _mine(
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    tests: Sequence[torch.Tensor],
    *,
    g: torch.Generator,
    dim: int | None,
    hidden: int,
    embed: int,
    steps: int,
    batch_size: int,
    lr: float,
    eval_every: int,
    squash: float = 3.0,
    max_fit: int = 4096,
    max_val: int = 1024,
    group: int = 64,
    noise: float = 0.0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batched core: E critics, one per pair ``x[e], y[e]`` ((E, N, d) tensors).

    Trains on the ``train`` rows, keeps per critic the parameters of the best DV bound on (at
    most ``max_val`` of) the ``val`` rows, and returns for every row set in ``tests`` the
    held-out bound and its influence values: ``[(dv (E,), psi (E, n_test)), ...]``.
    """
    E = x.shape[0]
    fit = train[:max_fit]  # train is shuffled: its first rows are a random subset
    x = _standardize(x, fit, dim)
    y = _standardize(y, fit, dim)

    def inputs(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # Noise (if any) is part of the variables measured: fresh draws for every training
        # minibatch, one seeded draw per held-out row. The squash c·tanh(·/c) is invertible
        # (the MI is unchanged) and bounds the critic's inputs, so a held-out state far outside
        # the training cloud cannot produce an extreme score: one such score on a negative
        # pair can drag the held-out DV bound far below zero.
        z = z[:, rows]
        if noise > 0:
            z = z + noise * torch.randn(z.shape, generator=g)
        return squash * torch.tanh(z / squash)

    held_out = [(inputs(x, r), inputs(y, r)) for r in [val[:max_val], *tests]]
    groups = [slice(i, min(i + group, E)) for i in range(0, E, group)]

    def evaluate(xr: torch.Tensor, yr: torch.Tensor, influence: bool = False):
        # In groups of critics: the (E, n, n) score matrix of all critics at once is large.
        outs = []
        for sel in groups:
            fx, gy = f(xr[sel], sel), h(yr[sel], sel)
            outs.append(_dv_influence(fx, gy) if influence else (_dv(fx, gy),))
        return [torch.cat(parts) for parts in zip(*outs)]

    with torch.enable_grad():
        # f's output layers start at zero: T(x, y) = f(x)ᵀ g(y) ≡ 0, so the DV bound starts at
        # exactly 0 (a random critic starts far below, and on held-out data can stay there).
        f = _Critic(E, x.shape[-1], hidden, embed, g, zero_out=True)
        h = _Critic(E, y.shape[-1], hidden, embed, g, zero_out=False)
        params = f.params() + h.params()
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps))
        )
        best = torch.full((E,), -math.inf)
        best_params = [p.detach().clone() for p in params]
        bs = min(batch_size, train.numel())
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                # Model selection per critic on the validation bound; step 0 is the zero critic
                # (bound 0), so a critic that only overfits the training rows is never chosen.
                with torch.no_grad():
                    (v,) = evaluate(*held_out[0])
                    better = v > best
                    best = torch.where(better, v, best)
                    for p, keep in zip(params, best_params):
                        keep.copy_(torch.where(better.view(-1, *[1] * (p.dim() - 1)), p, keep))
            if step == steps:
                break
            idx = train[torch.randperm(train.numel(), generator=g)[:bs]]
            loss = -_dv(f(inputs(x, idx)), h(inputs(y, idx))).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        for p, keep in zip(params, best_params):
            p.copy_(keep)
        return [tuple(evaluate(xr, yr, influence=True)) for xr, yr in held_out[1:]]


def estimate_mi_many(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    *,
    dim: int | None = None,
    hidden: int = 64,
    embed: int = 32,
    steps: int = 600,
    batch_size: int = 512,
    lr: float = 3e-3,
    eval_every: int = 50,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    return_se: bool = False,
) -> list[float] | tuple[list[float], list[float]]:
    """MINE estimates (nats) of MI(xᵢ; yᵢ) for several pairs, trained together as one batch.

    Each pair gets its own critic; pairs may differ in dimension (inputs are zero-padded, which a
    linear first layer ignores) but must have the same number of samples, and share one seeded
    train/validation/test split. See :func:`estimate_mi` for the arguments. With ``return_se``
    returns ``(estimates, standard errors)``; the standard error is that of the held-out bound
    over the test rows (first-order U-statistic expansion), for the trained critic: it does not
    include the spread over training seeds.
    """
    mine = dict(
        dim=dim,
        hidden=hidden,
        embed=embed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
    )
    _check_mine_args(**mine)
    if len(xs) != len(ys) or not xs:
        raise ValueError("xs and ys must be non-empty sequences of the same length")
    pairs = [_check_xy(x, y, i) for i, (x, y) in enumerate(zip(xs, ys))]
    n = pairs[0][0].shape[0]
    if any(p[0].shape[0] != n for p in pairs):
        raise ValueError("all pairs must have the same number of samples")
    g = torch.Generator().manual_seed(seed)
    train, val, test = _split(n, val_fraction, test_fraction, g)
    x = _pad([p[0] for p in pairs], max(p[0].shape[1] for p in pairs))
    y = _pad([p[1] for p in pairs], max(p[1].shape[1] for p in pairs))
    [(dv, psi)] = _mine(x, y, train, val, [test], g=g, **mine)
    values = [float(v) for v in dv]
    if not return_se:
        return values
    se = psi.std(-1) / math.sqrt(psi.shape[-1])
    return values, [float(v) for v in se]


def estimate_mi(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dim: int | None = None,
    hidden: int = 64,
    embed: int = 32,
    steps: int = 600,
    batch_size: int = 512,
    lr: float = 3e-3,
    eval_every: int = 50,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> float:
    """Mutual information I(X; Y) in nats, by a MINE (Donsker–Varadhan) critic.

    Args:
        x, y: (N, d_x) and (N, d_y) paired samples (1-D tensors are one column).
        dim: if set, each side is first reduced to its top ``dim`` principal components
            (whitened), fitted on the training rows. A function of x (or of y) can only lower
            the MI (data processing inequality), so the result stays a lower bound, of the MI
            of the projections; it keeps a few-thousand-sample critic from overfitting
            hundreds of input coordinates.
        hidden, embed: width of the critic's MLPs and of its embedding (T(x, y) = f(x)ᵀ g(y)).
        steps, batch_size, lr: Adam training (cosine-decayed lr); every minibatch scores all
            batch_size² pairs (the off-diagonal ones are the product-of-marginals samples).
        eval_every: validation interval for model selection.
        val_fraction, test_fraction: held-out shares; the returned value is the bound on the
            test share with the critic of the best validation bound.
        seed: seeds the split, the initialization and the minibatches (same seed, same value).

    Returns:
        The held-out DV bound (nats), not clamped: the critic starts at T ≡ 0 (bound 0) and the
        critic kept is the best on validation rows, so it is ≥ 0 up to test-sample noise (its
        standard error: :func:`estimate_mi_many` with ``return_se=True``). It underestimates
        when the critic cannot fit the density ratio (large d or MI with few samples). On
        correlated Gaussians with N = 10⁴, d ≤ 4 and MI ≤ 2.5 nats it is within 10% of the
        analytic value (tests/test_emergence.py).
    """
    return estimate_mi_many(
        [x],
        [y],
        dim=dim,
        hidden=hidden,
        embed=embed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )[0]


# --------------------------------------------------------------------------- hooks


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (``model.model.layers`` for Llama/Gemma)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def check_layers(model, layers: Sequence[int] | None) -> list[int]:
    """Validate block indices against the model; ``None`` means all blocks."""
    n = len(decoder_blocks(model))
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer indices must be integers, got {layer!r}")
        if not 0 <= layer < n:
            raise ValueError(
                f"layer {layer} is beyond the model: it has {n} blocks (valid indices 0..{n - 1})"
            )
        out.append(layer)
    if not out:
        raise ValueError("layers is empty: give at least one block index")
    return sorted(set(out))


@torch.inference_mode()
def capture_block_states(
    model, input_ids: torch.Tensor, layers: Sequence[int] | None = None, attention_mask=None
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run the model once and return ``(inputs, outputs)`` of the chosen blocks.

    ``inputs[l]`` and ``outputs[l]`` are (B, T, d) float32: what block l received and what it
    returned (the first element when a block returns a tuple).
    """
    layers = check_layers(model, layers)
    blocks = decoder_blocks(model)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre_hook(idx):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            inputs[idx] = h.detach().float().clone()

        return hook

    def post_hook(idx):
        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            outputs[idx] = h.detach().float().clone()

        return hook

    try:
        for idx in layers:
            handles.append(blocks[idx].register_forward_pre_hook(pre_hook(idx), with_kwargs=True))
            handles.append(blocks[idx].register_forward_hook(post_hook(idx), with_kwargs=True))
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


# --------------------------------------------------------------------------- data


def text_windows(corpus, tokenizer, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` consecutive tokens of natural text, drawn with ``seed``.

    As in the paper's natural-sentence data (spans that start right after a period and hold no
    newline), windows never cross a sentence or a paragraph: each sentence is cut into
    consecutive, non-overlapping windows from its start (a remainder shorter than ``seq_len`` is
    dropped). The first window of a sentence starts it; later ones start mid-sentence, as the
    paper's did (it kept the last 8 tokens of 16-token spans). Long sentences thus give several
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
    if len(windows) < n:
        raise ValueError(
            f"the corpus yields only {len(windows)} windows of {seq_len} tokens inside sentences; "
            f"asked for n={n} (lower n or seq_len, or pass a larger corpus)"
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


class _Projector:
    """z-score each coordinate, then keep the top ``dim`` principal components (whitened)."""

    def __init__(self, x: torch.Tensor, dim: int):
        self.mean = x.mean(0)
        self.std = x.std(0) + 1e-6
        z = (x - self.mean) / self.std
        _, s, vh = torch.linalg.svd(z, full_matrices=False)
        k = min(dim, vh.shape[0])
        self.basis = vh[:k].T / (s[:k] / math.sqrt(max(x.shape[0] - 1, 1))).clamp_min(1e-6)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.basis


# --------------------------------------------------------------------------- IE


@dataclasses.dataclass
class EmergenceResult:
    """IE per block (and optionally per position), with the MI terms it is made of (nats).

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
    mi_macro: list[float]
    mi_micro: list[float]
    mi_micro_positions: list[list[float]]
    mi_context_positions: list[list[float]] | None
    ie_positions: list[list[float]] | None
    n_sequences: int
    seq_len: int
    dim: int
    bos: bool
    mine: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.inference_mode()
def information_emergence(
    model,
    tokenizer,
    corpus=None,
    *,
    layers: Sequence[int] | None = None,
    n_sequences: int = 1024,
    seq_len: int = 8,
    dim: int = 16,
    positions: bool = False,
    chunk: int = 128,
    seed: int = 0,
    progress: bool = False,
    **mine,
) -> EmergenceResult:
    """IE(l) of the chosen blocks on ``n_sequences`` sentence windows of ``seq_len`` tokens.

    Args:
        model, tokenizer: from :func:`entcal.models.load`.
        corpus: human text (default: :func:`entcal.corpora.load_corpus`).
        layers: block indices (default all); an index beyond the model is a ``ValueError``.
        n_sequences, seq_len: samples per MI estimate, and T.
        dim: principal components kept per state before MINE.
        positions: also estimate the in-context MI at every position (IE vs position).
        chunk: sequences per forward pass.
        seed: window sampling and MINE seed.
        progress: tqdm bars.
        **mine: passed to :func:`estimate_mi_many` (steps, batch_size, hidden, embed, lr, ...).
    """
    from entcal.corpora import load_corpus

    layers = check_layers(model, layers)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if n_sequences < 100:
        raise ValueError(f"n_sequences must be >= 100 for MI estimation, got {n_sequences}")
    corpus = load_corpus() if corpus is None else corpus
    windows = text_windows(corpus, tokenizer, n_sequences, seq_len, seed=seed)
    bos = _bos_id(tokenizer)
    device = next(model.parameters()).device
    off = 1 if bos is not None else 0
    keep_pos = list(range(seq_len)) if positions else [seq_len - 1]

    proj: dict[tuple[int, str], _Projector] = {}
    macro_in: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    macro_out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
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
            for side, states, store in (("in", ins, macro_in), ("out", outs, macro_out)):
                h = states[layer][:, off:, :].cpu()  # drop BOS
                if (layer, side) not in proj:
                    proj[(layer, side)] = _Projector(h.reshape(-1, h.shape[-1]), dim)
                store[layer].append(proj[(layer, side)](h[:, keep_pos, :]))
        if bar is not None:
            bar.update(1)
    # Micro: each distinct token alone (after BOS where the model needs it); the states of
    # equal tokens are equal, so one forward per distinct token suffices.
    uniq, inverse = windows.unique(return_inverse=True)
    micro_ids = uniq[:, None]
    if bos is not None:
        micro_ids = torch.cat([torch.full_like(micro_ids, bos), micro_ids], dim=1)
    m_in: dict[int, torch.Tensor] = {}
    m_out: dict[int, torch.Tensor] = {}
    for start in range(0, micro_ids.shape[0], chunk * seq_len):
        ins, outs = capture_block_states(
            model, micro_ids[start : start + chunk * seq_len].to(device), layers
        )
        for layer in layers:
            a = proj[(layer, "in")](ins[layer][:, -1, :].cpu())
            b = proj[(layer, "out")](outs[layer][:, -1, :].cpu())
            m_in[layer] = a if layer not in m_in else torch.cat([m_in[layer], a])
            m_out[layer] = b if layer not in m_out else torch.cat([m_out[layer], b])
    if bar is not None:
        bar.update(1)
        bar.close()

    xs, ys, keys = [], [], []
    for layer in layers:
        cin = torch.cat(macro_in[layer])
        cout = torch.cat(macro_out[layer])
        for j, t in enumerate(keep_pos):
            xs.append(cin[:, j])
            ys.append(cout[:, j])
            keys.append(("ctx", layer, t))
        for t in range(seq_len):
            xs.append(m_in[layer][inverse[:, t]])
            ys.append(m_out[layer][inverse[:, t]])
            keys.append(("micro", layer, t))
    mine = {"seed": seed, **mine}
    with torch.inference_mode(False):
        values = estimate_mi_many(xs, ys, **mine)
    mi = dict(zip(keys, values))
    ie, mi_macro, mi_micro, micro_pos, ctx_pos, ie_pos = [], [], [], [], [], []
    for layer in layers:
        micro = [mi[("micro", layer, t)] for t in range(seq_len)]
        macro = mi[("ctx", layer, seq_len - 1)]
        micro_pos.append(micro)
        mi_micro.append(sum(micro) / seq_len)
        mi_macro.append(macro)
        ie.append(macro - sum(micro) / seq_len)
        if positions:
            ctx = [mi[("ctx", layer, t)] for t in range(seq_len)]
            ctx_pos.append(ctx)
            ie_pos.append([ctx[t] - sum(micro[: t + 1]) / (t + 1) for t in range(seq_len)])
    return EmergenceResult(
        model=str(getattr(model, "name_or_path", type(model).__name__)),
        layers=layers,
        ie=ie,
        mi_macro=mi_macro,
        mi_micro=mi_micro,
        mi_micro_positions=micro_pos,
        mi_context_positions=ctx_pos if positions else None,
        ie_positions=ie_pos if positions else None,
        n_sequences=n_sequences,
        seq_len=seq_len,
        dim=dim,
        bos=bos is not None,
        mine=mine,
    )


# --------------------------------------------------------------------------- report


def write_report(result: EmergenceResult, meta: dict, out) -> list:
    """Write ``results.json``, ``report.md`` and PNG plots into ``out``; return the paths."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, **result.to_dict()}
    (out / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=True))
    paths = [out / "results.json"]

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    ax1.plot(result.layers, result.ie, "o-", color="C3")
    ax1.axhline(0.0, color="gray", ls=":")
    ax1.set_ylabel("IE(l) (nats)")
    ax1.set_title(f"{result.model}: information emergence per block")
    ax2.plot(result.layers, result.mi_macro, "o-", label="MI macro (last token, in context)")
    ax2.plot(result.layers, result.mi_micro, "s-", label="mean MI micro (token alone)")
    ax2.set_xlabel("block l")
    ax2.set_ylabel("MI(h_{l+1}; h_l) (nats)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    p = out / "ie_per_layer.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    if result.ie_positions:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(result.layers)))
        for layer, row, c in zip(result.layers, result.ie_positions, colors):
            ax.plot(range(result.seq_len), row, "-", color=c, lw=1, label=f"block {layer}")
        ax.set_xlabel("position t")
        ax.set_ylabel("IE(l, t) (nats)")
        ax.set_title(f"{result.model}: IE vs position")
        if len(result.layers) <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "ie_per_position.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

    lines = [
        f"# Information emergence: {result.model}",
        "",
        "Chen et al. (arXiv 2405.12617): IE(l) = MI(h_{l+1}^macro; h_l^macro) − mean_t "
        "MI(h_{l+1}^micro_t; h_l^micro_t). Macro: the last token's state in the full sequence; "
        "micro: token t fed alone. MI by a MINE (Donsker–Varadhan) critic, held-out test bound.",
        "",
        f"{result.n_sequences} sentence windows of {result.seq_len} tokens from "
        f"`{meta.get('human', 'pydoc')}`, states reduced to {result.dim} principal components, "
        f"BOS prepended: {result.bos}; MINE settings {result.mine}; {meta.get('seconds')} s. "
        "Values depend on the estimator: compare only at equal settings.",
        "",
        "| block | IE (nats) | MI macro | MI micro (mean over t) |",
        "|---|---|---|---|",
    ]
    for layer, ie, ma, mi in zip(result.layers, result.ie, result.mi_macro, result.mi_micro):
        lines.append(f"| {layer} | {ie:.3f} | {ma:.3f} | {mi:.3f} |")
    lines += [""] + [f"![{q.stem}]({q.name})" for q in paths[1:]] + [""]
    p = out / "report.md"
    p.write_text("\n".join(lines))
    paths.insert(1, p)
    return paths
