"""The built-in chain: temperature, then the truncation rules, in transformers' order.

Order (as transformers' ``generate`` appends its warpers; of the keys transformers lacks,
dynamic temperature replaces the temperature as llama.cpp's ``temp_ext`` does, smoothing follows
it as in text-generation-webui's fallback order, and top-nσ comes first among the truncations,
as in llama.cpp; text-generation-webui's preset order puts top-nσ before the temperature)::

    temperature (or dynatemp) -> smoothing -> top_n_sigma -> top_h -> top_k -> top_p -> min_p
        -> typical -> epsilon -> eta

Each stage sees the output of the previous one (masked tokens at ``-inf``), exactly as a
``LogitsProcessorList`` of transformers' warpers does. For another order write the stages as a
pipeline, ``"min_p=0.05 | top_p=0.9"`` (see :mod:`entcal.decoding.pipeline`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from entcal.decoding import ops
from entcal.decoding.base import Decoder, format_value, parse_float, parse_int

__all__ = ["CHAIN_KEYS", "KEY_ALIASES", "ChainDecoder"]

# key -> (neutral value, valid range text)
CHAIN_KEYS: dict[str, tuple[Any, str]] = {
    "temperature": (1.0, "> 0 (use top_k=1 or 'greedy' for greedy decoding)"),
    "dynatemp_range": (0.0, ">= 0 (0 = off)"),
    "dynatemp_exponent": (1.0, "> 0"),
    "smoothing_factor": (0.0, ">= 0 (0 = off)"),
    "smoothing_curve": (1.0, ">= 1"),
    "top_n_sigma": (float("inf"), "> 0"),
    "top_h": (0.0, "in [0, 1] (0 = off)"),
    "top_k": (0, "an integer >= 0 (0 = off)"),
    "top_p": (1.0, "in [0, 1] (1 = off)"),
    "min_p": (0.0, "in [0, 1] (0 = off)"),
    "typical": (1.0, "in (0, 1] (1 = off)"),
    "epsilon": (0.0, "in [0, 1) (0 = off)"),
    "eta": (0.0, "in [0, 1) (0 = off)"),
    "min_tokens_to_keep": (1, "an integer >= 1"),
}
#: Keys that only modify another key's stage (alone they change nothing).
_MODIFIERS = ("min_tokens_to_keep", "dynatemp_exponent", "smoothing_curve")
#: transformers' GenerationConfig names accepted as aliases.
KEY_ALIASES = {"typical_p": "typical", "epsilon_cutoff": "epsilon", "eta_cutoff": "eta"}


def _validate(key: str, value: Any) -> Any:
    rng = CHAIN_KEYS[key][1]
    if key in ("top_k", "min_tokens_to_keep"):
        return parse_int(key, value, lo=0 if key == "top_k" else 1, range_text=rng)
    if key in ("temperature", "dynatemp_exponent"):
        return parse_float(key, value, lo=0.0, lo_open=True, range_text=rng)
    if key in ("dynatemp_range", "smoothing_factor"):
        return parse_float(key, value, lo=0.0, range_text=rng)
    if key == "smoothing_curve":
        return parse_float(key, value, lo=1.0, range_text=rng)
    if key == "top_n_sigma":
        v = float(value) if not isinstance(value, str) else None
        if v == float("inf"):
            return v
        return parse_float(key, value, lo=0.0, lo_open=True, range_text=rng)
    if key in ("top_p", "min_p", "top_h"):
        return parse_float(key, value, lo=0.0, hi=1.0, range_text=rng)
    if key == "typical":
        return parse_float(key, value, lo=0.0, hi=1.0, lo_open=True, range_text=rng)
    # epsilon, eta
    return parse_float(key, value, lo=0.0, hi=1.0, hi_open=True, range_text=rng)


@dataclasses.dataclass(frozen=True, eq=True)
class ChainDecoder(Decoder):
    """Temperature followed by truncation; every parameter at its neutral value is skipped.

    Rules (``p = softmax(logits / temperature)``):

    * ``temperature``: ``logits / T``.
    * ``dynatemp_range``, ``dynatemp_exponent`` (llama.cpp, koboldcpp): ``T`` from the
      normalized entropy, between ``max(0, T - range)`` and ``T + range``
      (:func:`entcal.decoding.ops.dynatemp_temperature`).
    * ``smoothing_factor``, ``smoothing_curve`` (text-generation-webui's quadratic sampling):
      ``l' = max l - k·f·d² + s·f·d³`` with ``d = l - max l``
      (:func:`entcal.decoding.ops.quadratic_smoothing`).
    * ``top_n_sigma`` (Tang et al. 2024, arXiv 2411.07641): keep ``l >= max l - n·σ(l)``.
    * ``top_h`` (Potraghloo et al. 2025, arXiv 2509.02510; transformers' TopH): among the 100
      most probable tokens, the longest head whose cumulative entropy stays within
      ``top_h · H`` (:func:`entcal.decoding.ops.top_h_mask`).
    * ``top_k``: keep the ``k`` largest logits (ties with the k-th kept).
    * ``top_p`` (Holtzman et al. 2020, arXiv 1904.09751): smallest most-probable set with mass
      ``>= top_p``.
    * ``min_p`` (Nguyen et al. 2024, arXiv 2407.01082): keep ``p >= min_p · max p``.
    * ``typical`` (Meister et al. 2023, arXiv 2202.00666): most typical tokens (smallest
      ``|-log p - H|``) up to mass ``typical``.
    * ``epsilon`` / ``eta`` (Hewitt et al. 2022, arXiv 2210.15191): keep ``p >= ε``; keep
      ``p >= min(η, √η·exp(-H))``.
    * ``min_tokens_to_keep``: every truncation keeps at least this many tokens.

    Example::

        >>> import torch
        >>> from entcal.decoding import parse
        >>> d = parse("temperature=0.5,top_p=0.9")
        >>> d(torch.tensor([[2.0, 1.0, 0.0, -1.0]]))   # logits [batch, vocab] -> same shape
        tensor([[4., 2., -inf, -inf]])
    """

    temperature: float = 1.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    top_n_sigma: float = float("inf")
    top_h: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical: float = 1.0
    epsilon: float = 0.0
    eta: float = 0.0
    min_tokens_to_keep: int = 1

    requires_history: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _validate(f.name, getattr(self, f.name)))

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> ChainDecoder:
        """Build from ``key -> text`` options (aliases allowed); ``ValueError`` on bad input."""
        kwargs: dict[str, Any] = {}
        for raw_key, text in options.items():
            key = KEY_ALIASES.get(raw_key, raw_key)
            if key not in CHAIN_KEYS:
                raise ValueError(
                    f"unknown decoder key {raw_key!r}; valid keys: {', '.join(CHAIN_KEYS)} "
                    "(or a named method: see entcal.decoding.methods())"
                )
            if key in kwargs:
                raise ValueError(f"decoder key {key!r} given twice")
            kwargs[key] = _validate(key, text)
        return cls(**kwargs)

    @property
    def spec(self) -> str:
        parts = [
            f"{name}={format_value(getattr(self, name))}"
            for name, (neutral, _) in CHAIN_KEYS.items()
            if getattr(self, name) != neutral
        ]
        if not parts:
            return "ancestral"
        return ",".join(parts)

    def is_identity(self) -> bool:
        """True for ``ancestral`` (sampling from the model's own distribution)."""
        return all(
            getattr(self, n) == neutral
            for n, (neutral, _) in CHAIN_KEYS.items()
            if n not in _MODIFIERS
        )

    __hash__ = Decoder.__hash__
    __str__ = Decoder.__str__

    def __repr__(self) -> str:
        return f"ChainDecoder({self.spec!r})"

    @functools.cached_property
    def _params(self) -> dict[str, Any]:
        """The parameters away from their neutral values (chain_apply's default for the rest)."""
        return {n: getattr(self, n) for n, (neutral, _) in CHAIN_KEYS.items()
                if getattr(self, n) != neutral}  # fmt: skip

    def _process_checked(
        self, logits: Tensor, input_ids: Tensor | None, row_max: Tensor, extent: float | None
    ) -> Tensor:
        # The temperature stage's overflow check needs the row maxima the validation found.
        return chain_apply(logits, self._params, row_max=row_max, extent=extent)

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        return chain_apply(logits, self._params)

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        params: dict[str, Any] = {}
        for name, (neutral, _) in CHAIN_KEYS.items():
            vals = [getattr(d, name) for d in decoders]
            if all(v == vals[0] for v in vals):
                params[name] = vals[0]
            else:
                dtype = torch.long if isinstance(neutral, int) else torch.float64
                params[name] = torch.tensor(vals, dtype=dtype, device=logits.device)
        return chain_apply(logits, params)


def _neutral(value: Any, neutral: Any) -> bool:
    if isinstance(value, Tensor):
        return bool((value == neutral).all())
    return value == neutral


def chain_apply(
    logits: Tensor,
    params: Mapping[str, Any],
    row_max: Tensor | None = None,
    extent: float | None = None,
) -> Tensor:
    """Apply the chain with per-row (tensor ``[N]``) or shared (number) parameters.

    Rows at a stage's neutral value are untouched by that stage; a stage whose parameter is
    neutral for every row is skipped entirely. ``row_max`` ``[N]``: the rows' maxima, and
    ``extent`` their :func:`~entcal.decoding.ops.finite_extent`, if known.
    """
    x = logits
    owned = False  # whether x is our own tensor (then masks are applied in place)
    mk = params.get("min_tokens_to_keep", 1)
    t = params.get("temperature", 1.0)
    spread = params.get("dynatemp_range", 0.0)
    if not _neutral(spread, 0.0):
        t = ops.dynatemp_temperature(x, t, spread, params.get("dynatemp_exponent", 1.0))
    if not _neutral(t, 1.0):
        x = ops.temperature(x, t, row_max=row_max, extent=extent)
        owned = True
    factor = params.get("smoothing_factor", 0.0)
    if not _neutral(factor, 0.0):
        x = ops.quadratic_smoothing(x, factor, params.get("smoothing_curve", 1.0))
        owned = True
    for name, fn in _MASK_STAGES:
        if name not in params:
            continue
        v = params[name]
        if _neutral(v, CHAIN_KEYS[name][0]):
            continue
        write = _WRITE_STAGES.get(name)
        if write is not None and (out := write(x, v)) is not None:
            x, owned = out, True
            continue
        if owned:
            x.masked_fill_(fn(x, v, mk), float("-inf"))
        else:  # one pass that writes the output, instead of a copy and a fill
            x = torch.where(fn(x, v, mk), float("-inf"), x)
            owned = True
    return x if owned else logits.clone()


#: The truncation stages in transformers' order: (key, mask of the tokens to remove, from the
#: logits, the stage's value and min_tokens_to_keep).
_MASK_STAGES: tuple[tuple[str, Callable[[Tensor, Any, Any], Tensor]], ...] = (
    ("top_n_sigma", lambda z, v, mk: ops.top_n_sigma_mask(z, v)),
    ("top_h", lambda z, v, mk: ops.top_h_mask(z, v)),
    ("top_k", ops.top_k_mask),
    ("top_p", ops.top_p_mask),
    ("min_p", ops.min_p_mask),
    ("typical", ops.typical_mask),
    ("epsilon", lambda z, v, mk: _only_active(ops.epsilon_mask(z, v, mk), v, 0.0)),
    ("eta", lambda z, v, mk: _only_active(ops.eta_mask(z, v, mk), v, 0.0)),
)


#: Stages that write their output directly instead of a mask (they keep a handful of tokens:
#: ``-inf`` everywhere, the kept logits scattered back, no full-size mask to build and read).
_WRITE_STAGES: dict[str, Callable[[Tensor, Any], Tensor | None]] = {"top_h": ops.top_h_apply}


def _only_active(remove: Tensor, value: Any, neutral: Any) -> Tensor:
    """``remove`` restricted to the rows whose parameter differs from ``neutral``."""
    if isinstance(value, Tensor) and bool((value == neutral).any()):
        return remove & (value != neutral).view(-1, 1)
    return remove
