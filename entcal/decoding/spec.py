"""Decoder specs: one string used identically in Python, on the CLI and in vLLM requests.

Grammar::

    spec    := stage ("|" stage)*                      # a pipeline: stages in the order written
    stage   := name | chain | name ":" options
    chain   := key "=" value ("," key "=" value)*      # the built-in chain (see ChainDecoder)
    options := key "=" value ("," key "=" value)*      # the named method's own options

* a bare ``name`` is a registered method with default options: ``ancestral`` (no change),
  ``greedy`` (= ``top_k=1``), ``mirostat``, ``edt``, a method declared by an installed package
  under the ``entcal.decoders`` entry-point group (entcal itself declares ``calibrated`` and
  ``lookahead`` there; they are imported on first use), or anything added with
  :func:`register_method`;
* ``temperature=0.8,top_p=0.95`` is the chain; keys: ``temperature``, ``dynatemp_range``,
  ``dynatemp_exponent``, ``smoothing_factor``, ``smoothing_curve``, ``top_n_sigma``, ``top_h``,
  ``top_k``, ``top_p``, ``min_p``, ``typical`` (alias ``typical_p``), ``epsilon`` (alias
  ``epsilon_cutoff``), ``eta`` (alias ``eta_cutoff``), ``min_tokens_to_keep``;
* ``mirostat:tau=3.0,eta=0.1``, ``edt:theta=1.0``, ``xtc:threshold=0.1`` and
  ``dry:multiplier=0.8`` are named methods with options;
* ``min_p=0.1 | top_p=0.9`` applies its stages in the order written (see
  :mod:`entcal.decoding.pipeline`; the chain alone always uses transformers' order).

Whitespace around keys and values is ignored. ``str(parse(s))`` is the canonical spec and parses
back to an equal decoder. Every error is a ``ValueError`` naming the key and its valid range.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import metadata

from entcal.decoding.base import Decoder
from entcal.decoding.chain import CHAIN_KEYS, KEY_ALIASES, ChainDecoder

__all__ = ["ENTRY_POINTS", "methods", "parse", "parse_options", "register_method"]

Factory = Callable[[dict[str, str]], Decoder]

_REGISTRY: dict[str, Factory] = {}
#: Entry-point group where packages declare decoder methods: ``name = "module:factory"``, the
#: factory taking the option dict. They are loaded on first lookup, so ``decoding`` imports no
#: package above it (``entcal.calibrators`` declares ``calibrated`` and ``lookahead`` here).
ENTRY_POINTS = "entcal.decoders"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def register_method(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Register a named method: ``parse("name:k=v,...")`` calls ``factory({"k": "v", ...})``.

    The factory validates its options (raising ``ValueError`` naming the option and its range)
    and returns a :class:`Decoder` whose ``spec`` starts with ``name``. The decoder declares
    what it needs (``requires_history``, ``requires_input_ids``, :meth:`Decoder.bind`): adapters
    read those flags, so a decoder that needs ``input_ids`` without declaring it passes vLLM's
    admission and then fails in the engine, where its rows are left raw.
    """
    if not _NAME.match(name) or name in CHAIN_KEYS or name in KEY_ALIASES:
        raise ValueError(f"invalid method name {name!r} (an identifier that is not a chain key)")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
        raise ValueError(f"decoder method {name!r} is already registered")
    _REGISTRY[name] = factory


def _declared() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINTS)}


def methods() -> list[str]:
    """Names of the registered methods (plus those declared as entry points, not yet loaded)."""
    return sorted(set(_REGISTRY) | set(_declared()))


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
    if "|" in text:
        from entcal.decoding.pipeline import PipelineDecoder

        parts = [p.strip() for p in text.split("|")]
        for i, part in enumerate(parts):
            if not part:
                raise ValueError(f"malformed decoder spec {spec!r}: stage {i + 1} is empty")
        return PipelineDecoder([_parse_stage(p) for p in parts])
    return _parse_stage(text)


def _parse_stage(text: str) -> Decoder:
    spec = text
    name, colon, rest = text.partition(":")
    name = name.strip()
    if colon or ("=" not in text and "," not in text):
        if not _NAME.match(name):
            raise ValueError(f"malformed decoder spec {spec!r}: bad method name {name!r}")
        return _lookup(name)(parse_options(rest, what=f"{name!r}"))
    return ChainDecoder.from_options(parse_options(text))


def _lookup(name: str) -> Factory:
    if name not in _REGISTRY:
        declared = _declared().get(name)
        if declared is not None:
            try:
                factory = declared.load()
            except Exception as exc:
                raise ValueError(
                    f"decoder method {name!r} is declared by {declared.value!r} but cannot be "
                    f"loaded: {exc}"
                ) from exc
            register_method(name, factory, replace=True)
    if name not in _REGISTRY:
        if name in CHAIN_KEYS or name in KEY_ALIASES:
            raise ValueError(f"decoder key {name!r} needs a value, e.g. '{name}=...'")
        hint = ""
        if name in ("calibrated", "lookahead", "anchored"):
            hint = (
                f" ({name!r} is declared in entcal's package metadata, which is missing: "
                "reinstall entcal, e.g. pip install -e .)"
            )
        raise ValueError(
            f"unknown decoder {name!r}{hint}; methods: {', '.join(methods())}; "
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
