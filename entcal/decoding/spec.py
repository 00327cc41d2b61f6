"""Decoder specs: one string used identically in Python, on the CLI and in vLLM requests.

Grammar::

    spec    := name | chain | name ":" options
    chain   := key "=" value ("," key "=" value)*      # the built-in chain (see ChainDecoder)
    options := key "=" value ("," key "=" value)*      # the named method's own options

* a bare ``name`` is a registered method with default options: ``ancestral`` (no change),
  ``greedy`` (= ``top_k=1``), ``mirostat``, ``edt``, ``calibrated`` (registered by
  ``entcal.calibrators`` on first use), or anything added with :func:`register_method`;
* ``temperature=0.8,top_p=0.95`` is the chain; keys: ``temperature``, ``top_n_sigma``,
  ``top_k``, ``top_p``, ``min_p``, ``typical`` (alias ``typical_p``), ``epsilon`` (alias
  ``epsilon_cutoff``), ``eta`` (alias ``eta_cutoff``), ``min_tokens_to_keep``;
* ``mirostat:tau=3.0,eta=0.1`` and ``edt:theta=1.0`` are named methods with options.

Whitespace around keys and values is ignored. ``str(parse(s))`` is the canonical spec and parses
back to an equal decoder. Every error is a ``ValueError`` naming the key and its valid range.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from entcal.decoding.base import Decoder
from entcal.decoding.chain import CHAIN_KEYS, KEY_ALIASES, ChainDecoder

__all__ = ["methods", "parse", "parse_options", "register_method"]

Factory = Callable[[dict[str, str]], Decoder]

_REGISTRY: dict[str, Factory] = {}
# Methods defined in other entcal packages, imported on first lookup (the module registers them).
_LAZY: dict[str, str] = {
    "calibrated": "entcal.calibrators.decoder",
    "lookahead": "entcal.calibrators.decoder",
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def register_method(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Register a named method: ``parse("name:k=v,...")`` calls ``factory({"k": "v", ...})``.

    The factory validates its options (raising ``ValueError`` naming the option and its range)
    and returns a :class:`Decoder` whose ``spec`` starts with ``name``.
    """
    if not _NAME.match(name) or name in CHAIN_KEYS or name in KEY_ALIASES:
        raise ValueError(f"invalid method name {name!r} (an identifier that is not a chain key)")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
        raise ValueError(f"decoder method {name!r} is already registered")
    _REGISTRY[name] = factory


def methods() -> list[str]:
    """Names of the registered methods (plus lazily registered ones)."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def parse_options(text: str, *, what: str = "decoder") -> dict[str, str]:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}``; ``ValueError`` on malformed or repeated keys."""
    out: dict[str, str] = {}
    if not text.strip():
        return out
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(
                f"malformed {what} option {part.strip()!r}: expected key=value "
                "(e.g. 'temperature=0.8,top_p=0.95')"
            )
        if key in out:
            raise ValueError(f"{what} option {key!r} given twice")
        out[key] = value
    return out


def parse(spec: str | Decoder) -> Decoder:
    """Parse a decoder spec (see the module docstring); a :class:`Decoder` is returned as is."""
    if isinstance(spec, Decoder):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"decoder spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError("empty decoder spec; use 'ancestral' for plain sampling")
    name, colon, rest = text.partition(":")
    name = name.strip()
    if colon or ("=" not in text and "," not in text):
        if not _NAME.match(name):
            raise ValueError(f"malformed decoder spec {spec!r}: bad method name {name!r}")
        return _lookup(name)(parse_options(rest, what=f"{name!r}"))
    return ChainDecoder.from_options(parse_options(text))


def _lookup(name: str) -> Factory:
    if name not in _REGISTRY and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise ValueError(f"decoder method {name!r} is not available: {exc}") from exc
    if name not in _REGISTRY:
        if name in CHAIN_KEYS or name in KEY_ALIASES:
            raise ValueError(f"decoder key {name!r} needs a value, e.g. '{name}=...'")
        raise ValueError(
            f"unknown decoder {name!r}; methods: {', '.join(methods())}; "
            f"or chain keys: {', '.join(CHAIN_KEYS)}"
        )
    return _REGISTRY[name]


def _no_options(name: str, decoder: Decoder) -> Factory:
    def factory(options: dict[str, str]) -> Decoder:
        if options:
            raise ValueError(f"decoder {name!r} takes no options, got {', '.join(options)}")
        return decoder

    return factory


register_method("ancestral", _no_options("ancestral", ChainDecoder()))
register_method("greedy", _no_options("greedy", ChainDecoder(top_k=1)))
