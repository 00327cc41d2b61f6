"""Human text: corpora of documents and the (prompt, human continuation) pairs built from them.

The default corpus needs no download and is not copied into this repository: it is the English
reference documentation that CPython ships in its standard library (``pydoc_data.topics``, about
465 KB), split into documents of a few paragraphs each. Other sources:

* a ``.txt`` file: documents separated by blank lines (paragraph groups are merged up to the same
  document size as the default corpus only if ``merge_paragraphs=True``);
* a ``.jsonl`` file: one JSON object per line, the text under a named field (default ``text``);
* ``hf:NAME[:SPLIT]``: a Hugging Face ``datasets`` dataset, when that package is installed and the
  dataset is available locally (the caller's business, as with hub models).

Pairs follow the protocol of Cao, Valiant & Liang, "On the Entropy Calibration of Language Models"
(arXiv 2511.11966): the prompt is the first ``P`` tokens of a document (default 128, with the
tokenizer's BOS kept: Gemma degenerates without it), the human continuation the next ``L`` tokens
(default 256); documents too short are skipped; the order is a seeded shuffle.

Example::

    >>> from entcal import corpora, models
    >>> _, tok = models.load("smollm2-135m")
    >>> pairs = corpora.make_pairs(corpora.load_corpus(), tok, prompt_tokens=128,
    ...                            continuation_tokens=256, n=32, seed=0)
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_CORPUS",
    "Corpus",
    "TextPair",
    "default_corpus",
    "load_corpus",
    "make_pairs",
]

DEFAULT_CORPUS = "pydoc"
# A few paragraphs: enough for 128 + 256 tokens of prose, small enough that the ~465 KB of the
# default corpus yields over 200 such documents.
_DOC_MIN_CHARS = 1800
_DOC_MAX_CHARS = 2400


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A named list of documents (plain strings)."""

    name: str
    documents: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.documents)

    def split(self, part: str, test_fraction: float = 0.2, seed: int = 0) -> Corpus:
        """A deterministic train/test split of the documents (``part`` is 'train' or 'test')."""
        if part not in ("train", "test"):
            raise ValueError(f"split part must be 'train' or 'test', got {part!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        order = list(range(len(self.documents)))
        random.Random(f"entcal-split-{seed}").shuffle(order)
        n_test = max(1, round(test_fraction * len(order)))
        chosen = sorted(order[:n_test] if part == "test" else order[n_test:])
        return Corpus(f"{self.name}:{part}", tuple(self.documents[i] for i in chosen))


@dataclasses.dataclass(frozen=True)
class TextPair:
    """A prompt and its human continuation, as token ids of one tokenizer."""

    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    document_index: int


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def _merge(paragraphs: Iterable[str], min_chars: int, max_chars: int) -> list[str]:
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + len(para) > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def default_corpus() -> Corpus:
    """Python's own documentation topics (``pydoc_data``), cut into documents of a few paragraphs."""
    from pydoc_data.topics import topics

    # One stream of paragraphs over the topics in a fixed order: short topics join their
    # neighbours instead of becoming documents too short to use.
    paragraphs = [p for key in sorted(topics) for p in _paragraphs(topics[key])]
    documents = _merge(paragraphs, _DOC_MIN_CHARS, _DOC_MAX_CHARS)
    # Some topics repeat others verbatim; a duplicate would leak across a train/test split.
    return Corpus(DEFAULT_CORPUS, tuple(dict.fromkeys(documents)))


def _check_nonempty(docs: Sequence[str], where: str) -> None:
    if not docs:
        raise ValueError(f"corpus {where} holds no text")


def _load_txt(path: Path, merge_paragraphs: bool) -> Corpus:
    text = path.read_text(encoding="utf-8")
    paras = _paragraphs(text)
    docs = _merge(paras, _DOC_MIN_CHARS, _DOC_MAX_CHARS) if merge_paragraphs else paras
    _check_nonempty(docs, str(path))
    return Corpus(str(path), tuple(docs))


def _load_jsonl(path: Path, field: str) -> Corpus:
    docs: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{lineno}: no field {field!r} in this JSON line")
            value = record[field]
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string"
                )
            if value.strip():
                docs.append(value)
    _check_nonempty(docs, str(path))
    return Corpus(str(path), tuple(docs))


def _load_hf(spec: str, field: str) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"corpus {spec!r} needs the 'datasets' package, which is not installed"
        ) from None
    parts = spec.split(":")
    name = parts[1]
    split = parts[2] if len(parts) > 2 else "train"
    dataset = datasets.load_dataset(name, split=split)
    if field not in dataset.column_names:
        raise ValueError(f"dataset {name!r} has no column {field!r} ({dataset.column_names})")
    docs = [t for t in dataset[field] if isinstance(t, str) and t.strip()]
    _check_nonempty(docs, spec)
    return Corpus(spec, tuple(docs))


def load_corpus(
    source: str | Path | None = None, *, field: str = "text", merge_paragraphs: bool = False
) -> Corpus:
    """Load human text.

    Args:
        source: ``None`` or ``"pydoc"`` for the embedded default; a path to a ``.txt`` or
            ``.jsonl`` file; or ``"hf:NAME[:SPLIT]"`` for a ``datasets`` dataset.
        field: the text field of a ``.jsonl`` line or dataset row.
        merge_paragraphs: for ``.txt``, merge consecutive paragraphs into documents of a few
            paragraphs (as the default corpus does) instead of one document per paragraph.
    """
    if source is None or str(source) == DEFAULT_CORPUS:
        return default_corpus()
    if isinstance(source, str) and source.startswith("hf:"):
        return _load_hf(source, field)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"corpus {path} is a folder; pass a .txt or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path, field)
    if suffix in (".txt", ".text", ".md"):
        return _load_txt(path, merge_paragraphs)
    raise ValueError(f"corpus file {path}: unknown format {suffix!r} (use .txt or .jsonl)")


def make_pairs(
    corpus: Corpus | Sequence[str],
    tokenizer,
    *,
    prompt_tokens: int = 128,
    continuation_tokens: int = 256,
    min_continuation_tokens: int | None = None,
    n: int | None = None,
    seed: int = 0,
    at_least: int = 0,
) -> list[TextPair]:
    """Turn documents into (prompt, human continuation) token pairs.

    Each document is tokenized with the tokenizer's special tokens (so BOS is kept where the
    tokenizer adds one; a trailing EOS it adds is dropped). The prompt is the first
    ``prompt_tokens`` tokens, the continuation the following tokens, at most
    ``continuation_tokens`` of them. Documents with fewer than ``min_continuation_tokens`` (default:
    ``continuation_tokens``) continuation tokens are skipped. Document order is shuffled with
    ``seed``; at most ``n`` pairs are returned (all that qualify if ``n`` is None).

    Raises ``ValueError`` if fewer than ``at_least`` documents qualify, saying how many do and
    how long they must be (commands pass ``at_least=n`` or 1 so a run fails before any work).
    """
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    if continuation_tokens < 1:
        raise ValueError(f"continuation_tokens must be >= 1, got {continuation_tokens}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n is not None and at_least > n:
        raise ValueError(f"at_least={at_least} asks for more pairs than n={n}")
    min_cont = continuation_tokens if min_continuation_tokens is None else min_continuation_tokens
    if not 1 <= min_cont <= continuation_tokens:
        raise ValueError(
            f"min_continuation_tokens must lie in [1, {continuation_tokens}], got {min_cont}"
        )
    docs = corpus.documents if isinstance(corpus, Corpus) else tuple(corpus)
    if not docs:
        raise ValueError("the corpus holds no documents")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    pairs: list[TextPair] = []
    need = prompt_tokens + min_cont
    # Tokenize in chunks so a huge corpus is not tokenized beyond what n needs.
    chunk = 256
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        encoded = tokenizer([docs[i] for i in idx], add_special_tokens=True)["input_ids"]
        for doc_index, ids in zip(idx, encoded):
            if ids and eos is not None and ids[-1] == eos and len(ids) > 1:
                ids = ids[:-1]
            if len(ids) < need:
                continue
            pairs.append(
                TextPair(
                    prompt_ids=tuple(ids[:prompt_tokens]),
                    continuation_ids=tuple(
                        ids[prompt_tokens : prompt_tokens + continuation_tokens]
                    ),
                    document_index=doc_index,
                )
            )
            if n is not None and len(pairs) >= n:
                return pairs  # n >= at_least (checked above)
    if len(pairs) < at_least:
        name = corpus.name if isinstance(corpus, Corpus) else "given"
        length = f"{need} tokens ({prompt_tokens} prompt + {min_cont} continuation)"
        if not pairs:
            raise ValueError(
                f"corpus {name!r}: no document has {length}; use shorter prompts or "
                "continuations, or a corpus of longer documents"
            )
        raise ValueError(
            f"corpus {name!r}: only {len(pairs)} documents have {length}, {at_least} are asked "
            f"for; ask for {len(pairs)} or use shorter texts"
        )
    return pairs
