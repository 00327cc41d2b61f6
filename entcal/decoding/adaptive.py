"""Adaptive decoders: mirostat v2 (per-sequence state) and entropy-based dynamic temperature."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from entcal.decoding import ops
from entcal.decoding.base import (
    Decoder,
    check_known,
    format_value,
    instance_rows,
    parse_float,
    parse_int,
)
from entcal.decoding.spec import register_method

__all__ = ["EDTDecoder", "MirostatDecoder"]

_LN2 = math.log(2.0)


class MirostatDecoder(Decoder):
    """Mirostat (Basu et al., ICLR 2021, arXiv 2007.14966), versions 1 and 2 as in llama.cpp.

    Each sequence keeps a threshold ``mu`` (bits), initially ``2·tau``, and truncates:

    * **v2** (default): remove tokens whose surprise ``-log2 p(v)`` exceeds ``mu`` (the most
      probable token is always kept);
    * **v1**: keep the ``k`` most probable tokens, ``k`` from the Zipf exponent estimated on the
      ``m`` most probable ones (see :func:`entcal.decoding.ops.mirostat_v1_k`).

    After the token ``x`` is sampled, ``mu <- mu - eta · (s(x) - tau)``, with ``s(x) = -log2 q(x)``
    under the *truncated, renormalized* distribution ``q`` of the mirostat step, as llama.cpp and
    text-generation-webui measure it (``surprise=truncated``, the default; in a pipeline, later
    stages may cut further: ``q`` is the mirostat stage's output). ``surprise=model`` measures it
    under the distribution entering the step, as the authors' reference code does (and entcal
    did before; ``mirostat:tau=3`` now follows llama.cpp), which makes the model surprise of
    the text, rather than the sampler's, track ``tau``. v1's ``k`` is llama.cpp's
    ``max(int(k), 1)`` (the authors round and add one); tokens tied with the k-th are kept.

    Spec: ``mirostat[:version=2,tau=3.0,eta=0.1,mu=6.0,m=100,temperature=1.0,
    surprise=truncated]`` (defaults version 2, tau 3.0 bits, eta 0.1, mu 2·tau, m 100 (v1 only),
    temperature 1).

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
    OPTIONS = ("version", "tau", "eta", "mu", "m", "temperature", "surprise")
    SURPRISE = ("truncated", "model")

    def __init__(
        self,
        tau: float = 3.0,
        eta: float = 0.1,
        mu: float | None = None,
        temperature: float = 1.0,
        *,
        version: int = 2,
        m: int = 100,
        surprise: str = "truncated",
    ) -> None:
        self.version = parse_int("version", version, lo=1, range_text="1 or 2")
        if self.version not in (1, 2):
            raise ValueError(f"version={version} is out of range; version must be 1 or 2")
        self.tau = parse_float("tau", tau, lo=0.0, lo_open=True)
        self.eta = parse_float("eta", eta, lo=0.0, lo_open=True)
        self.mu = None if mu is None else parse_float("mu", mu, lo=0.0)
        self.m = parse_int("m", m, lo=2, range_text="an integer >= 2")
        self.temperature = parse_float("temperature", temperature, lo=0.0, lo_open=True)
        if surprise not in self.SURPRISE:
            raise ValueError(
                f"surprise={surprise!r} is out of range; surprise must be one of "
                f"{', '.join(self.SURPRISE)}"
            )
        self.surprise = surprise
        self.mu_: Tensor | None = None  # [N] float64, bits
        self._last: tuple[Tensor, Tensor] | None = None  # (tempered logits, lse) of last call

    @property
    def mu0(self) -> float:
        return 2.0 * self.tau if self.mu is None else self.mu

    @classmethod
    def from_options(cls, options: dict[str, str]) -> MirostatDecoder:
        check_known("mirostat", options, cls.OPTIONS)
        return cls(**options)  # type: ignore[arg-type]  # __init__ parses and checks each one

    @property
    def spec(self) -> str:
        parts = [f"tau={format_value(self.tau)}", f"eta={format_value(self.eta)}"]
        if self.version != 2:
            parts.insert(0, f"version={self.version}")
        if self.mu is not None:
            parts.append(f"mu={format_value(self.mu)}")
        if self.version == 1 and self.m != 100:
            parts.append(f"m={self.m}")
        if self.temperature != 1.0:
            parts.append(f"temperature={format_value(self.temperature)}")
        if self.surprise != "truncated":
            parts.append(f"surprise={self.surprise}")
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
        return self._step(logits, self.mu_, self.temperature, None)

    def _step(
        self,
        logits: Tensor,
        mu: Tensor,
        temperature: float | Tensor,
        owners: Sequence[tuple[MirostatDecoder, Tensor]] | None,
    ) -> Tensor:
        """Truncate rows with their ``mu`` and remember what ``observe`` needs: for ``self``
        (``owners`` None), or for each ``(instance, its rows)`` of a grouped pass."""
        x = ops.temperature(logits, temperature) if not _is_one(temperature) else logits
        if self.version == 2:
            remove, lse = ops.mirostat_mask(x, mu)
        else:
            k = ops.mirostat_v1_k(x, mu, self.m)
            remove, lse = ops.top_k_mask(x, k), torch.logsumexp(x, dim=-1)
        out = x.masked_fill(remove, float("-inf"))
        if self.surprise == "truncated":  # the sampled-from distribution: removed tokens at -inf
            x, lse = out, torch.logsumexp(out, dim=-1)
        if owners is None:
            self._last = (x, lse)
        else:
            for d, idx in owners:
                d._last = (x.index_select(0, idx), lse.index_select(0, idx))
        return out

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
        self.mu_ = self.mu_.to(surprise.device) - self.eta * (surprise - self.tau)
        self._last = None

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        # One vectorized pass over rows that belong to different mirostat instances (vLLM: one
        # instance per request) of the same version, m and surprise measure. Row i takes the
        # next state row of its instance.
        kinds: dict[tuple, list[int]] = {}
        for i, d in enumerate(decoders):
            assert isinstance(d, MirostatDecoder)
            kinds.setdefault((d.version, d.m, d.surprise), []).append(i)
        if len(kinds) > 1:
            return super()._apply_group(decoders, logits, input_ids)
        dev = logits.device
        mu = torch.empty(len(decoders), dtype=torch.float64, device=dev)
        temp = torch.empty(len(decoders), dtype=torch.float64, device=dev)
        owners: list[tuple[MirostatDecoder, Tensor]] = []
        for d, rows in instance_rows(decoders):  # per instance, not per row
            assert isinstance(d, MirostatDecoder)
            if d.mu_ is None or d.mu_.shape[0] != len(rows):
                d.reset(len(rows))
            d.mu_ = d.mu_.to(dev)  # type: ignore[union-attr]  # state lives with the logits
            idx = torch.tensor(rows, device=dev)
            mu.index_copy_(0, idx, d.mu_)  # type: ignore[arg-type]
            temp.index_fill_(0, idx, d.temperature)
            owners.append((d, idx))
        return owners[0][0]._step(logits, mu, temp, owners)


def _is_one(t: float | Tensor) -> bool:
    return bool((t == 1.0).all()) if isinstance(t, Tensor) else t == 1.0


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
