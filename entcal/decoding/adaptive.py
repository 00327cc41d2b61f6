"""Adaptive decoders: mirostat v2 (per-sequence state) and entropy-based dynamic temperature."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from entcal.decoding import ops
from entcal.decoding.base import Decoder, check_known, format_value, parse_float
from entcal.decoding.spec import register_method

__all__ = ["EDTDecoder", "MirostatDecoder"]

_LN2 = math.log(2.0)


class MirostatDecoder(Decoder):
    """Mirostat v2 (Basu et al., ICLR 2021, arXiv 2007.14966; v2 as in llama.cpp).

    Each sequence keeps a threshold ``mu`` (bits), initially ``2·tau``. A step removes tokens
    whose surprise ``-log2 p(v)`` exceeds ``mu`` (the most probable token is always kept); after
    the token ``x`` is sampled, ``mu <- mu - eta · (s(x) - tau)`` with ``s(x) = -log2 p(x)`` under
    the distribution entering the mirostat step (the model's, after ``temperature``), as in the
    paper's reference code. llama.cpp instead measures ``s(x)`` under the truncated, renormalized
    distribution; with the paper's choice the *model* surprise of the generated text is what
    converges to ``tau``.

    Spec: ``mirostat[:tau=3.0,eta=0.1,mu=6.0,temperature=1.0]`` (defaults tau 3.0 bits,
    eta 0.1, mu 2·tau, temperature 1).

    Example::

        >>> import torch
        >>> from entcal.decoding import parse
        >>> d = parse("mirostat:tau=3.0")
        >>> d.reset(batch_size=1)                    # mu = 2·tau = 6 bits per sequence
        >>> d(torch.tensor([[4.0, 2.0, 0.0, -8.0]]))  # drop surprise > mu; sample from softmax
        tensor([[4., 2., 0., -inf]])
        >>> d.observe(torch.tensor([1]))             # mu -= eta·(surprise of token 1 - tau)
        >>> d.mu_
        tensor([5.9908], dtype=torch.float64)
    """

    requires_history: ClassVar[bool] = True
    OPTIONS = ("tau", "eta", "mu", "temperature")

    def __init__(
        self, tau: float = 3.0, eta: float = 0.1, mu: float | None = None, temperature: float = 1.0
    ) -> None:
        self.tau = parse_float("tau", tau, lo=0.0, lo_open=True)
        self.eta = parse_float("eta", eta, lo=0.0, lo_open=True)
        self.mu = None if mu is None else parse_float("mu", mu, lo=0.0)
        self.temperature = parse_float("temperature", temperature, lo=0.0, lo_open=True)
        self.mu_: Tensor | None = None  # [N] float64, bits
        self._last: tuple[Tensor, Tensor] | None = None  # (tempered logits, lse) of last call

    @property
    def mu0(self) -> float:
        return 2.0 * self.tau if self.mu is None else self.mu

    @classmethod
    def from_options(cls, options: dict[str, str]) -> MirostatDecoder:
        check_known("mirostat", options, cls.OPTIONS)
        return cls(**{k: float(parse_float(k, v)) for k, v in options.items()})

    @property
    def spec(self) -> str:
        parts = [f"tau={format_value(self.tau)}", f"eta={format_value(self.eta)}"]
        if self.mu is not None:
            parts.append(f"mu={format_value(self.mu)}")
        if self.temperature != 1.0:
            parts.append(f"temperature={format_value(self.temperature)}")
        return "mirostat:" + ",".join(parts)

    def reset(self, batch_size: int) -> None:
        self.mu_ = torch.full((batch_size,), self.mu0, dtype=torch.float64)
        self._last = None

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        n = logits.shape[0]
        if self.mu_ is None or self.mu_.shape[0] != n:
            self.reset(n)
        assert self.mu_ is not None
        self.mu_ = self.mu_.to(logits.device)
        x = ops.temperature(logits, self.temperature) if self.temperature != 1.0 else logits
        remove, lse = ops.mirostat_mask(x, self.mu_)
        self._last = (x, lse)
        return x.masked_fill(remove, float("-inf"))

    def observe(self, tokens: Tensor) -> None:
        if self._last is None or self.mu_ is None:
            return  # nothing decided yet (e.g. the prompt): no update
        x, lse = self._last
        tok = tokens.to(x.device).view(-1, 1)
        surprise = (lse - x.gather(-1, tok).flatten()).double() / _LN2
        # a masked / impossible token (surprise inf) would blow mu up: ignore it
        surprise = torch.where(
            torch.isfinite(surprise), surprise, torch.full_like(surprise, self.tau)
        )
        self.mu_ = self.mu_ - self.eta * (surprise - self.tau)
        self._last = None

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        # One vectorized pass over rows that belong to different mirostat instances (vLLM: one
        # instance per request). Row i takes the next state row of its instance.
        insts: dict[int, MirostatDecoder] = {}
        rows_of: dict[int, list[int]] = {}
        for i, d in enumerate(decoders):
            assert isinstance(d, MirostatDecoder)
            insts.setdefault(id(d), d)
            rows_of.setdefault(id(d), []).append(i)
        dev = logits.device
        mu = torch.empty(len(decoders), dtype=torch.float64, device=dev)
        temp = torch.empty(len(decoders), dtype=torch.float64, device=dev)
        index = {}
        for key, d in insts.items():
            if d.mu_ is None or d.mu_.shape[0] != len(rows_of[key]):
                d.reset(len(rows_of[key]))
            idx = torch.tensor(rows_of[key], device=dev)
            index[key] = idx
            mu.index_copy_(0, idx, d.mu_.to(dev))  # type: ignore[union-attr]
            temp.index_fill_(0, idx, d.temperature)
        x = ops.temperature(logits, temp)
        remove, lse = ops.mirostat_mask(x, mu)
        for key, d in insts.items():
            d._last = (x.index_select(0, index[key]), lse.index_select(0, index[key]))
        return x.masked_fill(remove, float("-inf"))


class EDTDecoder(Decoder):
    """Entropy-based dynamic temperature, EDT (Zhang, Bao & Huang 2024, arXiv 2403.14541).

    Per step and row, ``T = t0 · n^(theta / H)`` where ``H`` is the entropy (nats) of the model's
    next-token distribution and ``0 < n < 1``; the logits are divided by ``T``. A confident step
    (``H -> 0``) gets ``T -> 0`` (greedy); as ``H`` grows, ``T`` rises towards its maximum ``t0``.
    The paper fixes ``n = 0.8`` and tunes ``t0`` (the maximum temperature) and ``theta`` per task.
    ``T`` is floored at 1e-6 so that the division stays finite.

    Spec: ``edt[:t0=1.0,theta=1.0,n=0.8]`` (defaults t0 1.0, theta 1.0, n 0.8).

    Example::

        >>> import torch
        >>> from entcal.decoding import parse
        >>> d = parse("edt:t0=0.9,theta=0.5")
        >>> d(torch.tensor([[2.0, 1.0, 0.0, -1.0]]))   # H = 0.95: T = 0.9·0.8^(0.5/0.95) = 0.80
        tensor([[ 0.0000, -1.2500, -2.4999, -3.7499]])
    """

    OPTIONS = ("t0", "theta", "n")

    def __init__(self, t0: float = 1.0, theta: float = 1.0, n: float = 0.8) -> None:
        self.t0 = parse_float("t0", t0, lo=0.0, lo_open=True)
        self.theta = parse_float("theta", theta, lo=0.0)
        self.n = parse_float("n", n, lo=0.0, hi=1.0, lo_open=True, hi_open=True)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> EDTDecoder:
        check_known("edt", options, cls.OPTIONS)
        return cls(**{k: parse_float(k, v) for k, v in options.items()})

    @property
    def spec(self) -> str:
        return (
            f"edt:t0={format_value(self.t0)},theta={format_value(self.theta)},"
            f"n={format_value(self.n)}"
        )

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        n = logits.shape[0]
        dev = logits.device
        t = ops.edt_temperature(
            logits,
            ops.rows(self.t0, n, dev, torch.float64),
            ops.rows(self.n, n, dev, torch.float64),
            ops.rows(self.theta, n, dev, torch.float64),
        )
        return _divide_stable(logits, t)

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        dev = logits.device

        def col(name: str) -> Tensor:
            return torch.tensor(
                [getattr(d, name) for d in decoders], dtype=torch.float64, device=dev
            )

        t = ops.edt_temperature(logits, col("t0"), col("n"), col("theta"))
        return _divide_stable(logits, t)


def _divide_stable(logits: Tensor, t: Tensor) -> Tensor:
    """``(logits - max) / T``: equal to ``logits / T`` up to a per-row constant, and finite for
    tiny ``T`` (the maximum stays 0, the rest go to ``-inf`` rather than overflowing)."""
    mx = logits.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return (logits - mx) / t.view(-1, 1)


register_method("mirostat", MirostatDecoder.from_options)
register_method("edt", EDTDecoder.from_options)
