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
* windows: ``n_sequences`` (default 4096) distinct windows of T tokens cut from the sentences
  of human text, split once (seeded) into train / validation / test windows;
* MI is estimated by a MINE critic trained on the Donsker–Varadhan bound (Belghazi et al. 2018):

      I(X; Y) ≥ E_P[T(x, y)] − log E_{P_X ⊗ P_Y}[e^{T(x, y)}],

  with a separable critic T(x, y) = clip(f(x)ᵀ g(y), ±10) (f, g: two-layer MLPs with a linear
  skip), so every minibatch uses all B(B − 1) shuffled pairs as negatives in one matrix
  product. f's output layers start at zero, so T ≡ 0 and the bound starts at exactly 0; the
  critic kept is the best on validation rows (the zero critic included) and the *test* bound
  is returned with its standard error (the paper reported the maximum over training, biased
  up). Many estimates train at once as one batched network (``torch.bmm``);
* for IE, each state is reduced to ``dim`` (32) whitened principal components fitted on the
  train windows (a projection can only lower MI: the bound stays a lower bound), and
  independent N(0, σ²) noise (σ = ``noise`` = 1) is added to each component, which makes the
  MI of a deterministic block finite (see :func:`information_emergence` for why each choice).

Blocks are deterministic, so the MI between a block's input and output is formally infinite for
continuous states, as the paper's reviewers pointed out; with the noise it is finite but depends
on σ and ``dim``. Compare IE across layers or models only at equal settings.

Example::

    >>> import torch
    >>> from entcal.studies.emergence import estimate_mi
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(2000, 2); y = 0.8 * x + 0.6 * torch.randn(2000, 2)
    >>> 0.7 < estimate_mi(x, y, steps=200) < 1.1   # analytic: -log(1 - 0.64) = 1.02 nats
    True
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


def _whitener(fit: torch.Tensor, dim: int | None):
    """From (E, n, d) fitting rows: a map z-scoring each coordinate and, with ``dim``,
    projecting on the top ``dim`` principal axes of the z-scored rows, whitened (unit variance
    each). Batched over the E pairs."""
    mean, std = fit.mean(1, keepdim=True), fit.std(1, keepdim=True) + 1e-6
    basis = None
    if dim is not None and fit.shape[-1] > dim:
        zf = (fit - mean) / std
        cov = zf.transpose(1, 2) @ zf / max(fit.shape[1] - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals[:, -dim:].flip(-1), evecs[:, :, -dim:].flip(-1)
        basis = evecs / evals.clamp_min(1e-6).sqrt()[:, None, :]

    def apply(z: torch.Tensor) -> torch.Tensor:
        z = (z - mean) / std
        return z if basis is None else z @ basis

    return apply


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
    x = _whitener(x[:, fit], dim)(x)
    y = _whitener(y[:, fit], dim)(y)

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

    Inputs are z-scored with training statistics and squashed per coordinate with
    3·tanh(·/3), an invertible map (the MI is unchanged) that keeps held-out outliers from
    producing extreme critic scores; scores are clipped to ±10 for the same reason (a bounded
    critic still gives a valid DV bound).

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
    dropped), and repeated windows are kept once. The first window of a sentence starts it; later ones start mid-sentence, as the
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


# --------------------------------------------------------------------------- IE


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
    _check_mine_args(dim=dim, **mine)
    corpus = load_corpus() if corpus is None else corpus
    windows = text_windows(corpus, tokenizer, n_sequences, seq_len, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train, val, test = _split(n_sequences, val_fraction, test_fraction, g)
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
                cx.append(_whitener(a[fit_w, j][None], dim)(a[:, j][None])[0])
                cy.append(_whitener(b[fit_w, j][None], dim)(b[:, j][None])[0])
            a, b = torch.cat(mic_in[layer]), torch.cat(mic_out[layer])
            mx.append(_whitener(a[None, tok_of_row[fit_r]], dim)(a[None])[0][tok_of_row])
            my.append(_whitener(b[None, tok_of_row[fit_r]], dim)(b[None])[0][tok_of_row])
        settings = dict(g=g, dim=None, noise=float(noise), **mine)
        [(ctx_dv, ctx_psi)] = _mine(
            torch.stack(cx), torch.stack(cy), train, val, [test], **settings
        )
        micro = _mine(torch.stack(mx), torch.stack(my), m_train, m_val, m_tests, **settings)
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
    ax1.errorbar(result.layers, result.ie, yerr=result.ie_se, fmt="o-", color="C3", capsize=2)
    ax1.axhline(0.0, color="gray", ls=":")
    ax1.set_ylabel("IE(l) (nats, ± 1 SE)")
    ax1.set_title(f"{result.model}: information emergence per block")
    ax2.errorbar(
        result.layers,
        result.mi_macro,
        yerr=result.mi_macro_se,
        fmt="o-",
        capsize=2,
        label="MI macro (last token, in context)",
    )
    ax2.errorbar(
        result.layers,
        result.mi_micro,
        yerr=result.mi_micro_se,
        fmt="s-",
        capsize=2,
        label="mean MI micro (token alone)",
    )
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
        "micro: token t fed alone. MI: held-out Donsker–Varadhan bound of a MINE critic "
        "(selected on validation windows, evaluated on test windows), ± one standard error over "
        "the test windows (training-seed spread not included).",
        "",
        f"{result.n_sequences} distinct windows of {result.seq_len} tokens from "
        f"`{meta.get('human', 'pydoc')}` ({result.n_test} test windows); each state reduced to "
        f"{result.dim} whitened principal components plus N(0, {result.noise}²) noise per "
        f"component; BOS prepended: {result.bos}; seed {result.seed}; MINE settings "
        f"{result.mine}; {meta.get('seconds')} s. Values depend on these settings: compare only "
        "at equal settings.",
        "",
        "| block | IE (nats) | MI macro | MI micro (mean over t) |",
        "|---|---|---|---|",
    ]
    for i, layer in enumerate(result.layers):
        lines.append(
            f"| {layer} | {result.ie[i]:+.3f} ± {result.ie_se[i]:.3f} "
            f"| {result.mi_macro[i]:.3f} ± {result.mi_macro_se[i]:.3f} "
            f"| {result.mi_micro[i]:.3f} ± {result.mi_micro_se[i]:.3f} |"
        )
    lines += [""] + [f"![{q.stem}]({q.name})" for q in paths[1:]] + [""]
    p = out / "report.md"
    p.write_text("\n".join(lines))
    paths.insert(1, p)
    return paths
