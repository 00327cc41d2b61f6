"""The predictor's file format: safetensors + JSON, checksum, model fingerprint, shipped files.

A saved :class:`~entcal.calibrators.predictor.FutureEntropyPredictor` is a folder holding

* ``predictor.safetensors``: ``weights.<name>`` (the exported ridge or MLP weights, float32),
  ``x_mean``, ``x_scale`` (the feature standardization, ``(F,)``) and ``projection.tokens``,
  ``projection.matrix``, ``projection.offset`` (the model's
  :class:`~entcal.calibrators.state.HiddenProjection`);
* ``predictor.json``: ``format_version`` (2), ``kind``, ``feature_names``, ``y_mean``,
  ``y_scale`` (nats/token), held-out ``scores``, the ``gate`` (``threshold``, ``strength`` per
  position bucket, ``bucket_edges``, the ``base`` α, absent = 0), the ``fingerprint`` of the
  model it was fitted for, the SHA-256 of the tensor file, and training information.

:func:`load` never unpickles: a missing file raises ``FileNotFoundError``; a malformed,
truncated or corrupted one, or one fitted for another model, :class:`PredictorFileError`, before
any generation. The predictors shipped in the package (``entcal/data/predictor-<model>/``) are
found by :func:`shipped_predictor_for`, which matches fingerprints.

Example::

    >>> state = load(shipped_predictor_path("smollm2-135m"))   # learned attributes, by name
    >>> state["kind_"], state["gate_"]["bucket_edges"], state["x_mean_"].shape
    ('ridge', [64, 128, 192], (67,))
    >>> sorted(shipped_predictors())
    ['gemma3-270m', 'smollm2-135m']
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from entcal.calibrators.state import HiddenProjection, feature_names

if TYPE_CHECKING:
    from entcal.calibrators.predictor import FutureEntropyPredictor

__all__ = [
    "FORMAT_VERSION",
    "PredictorFileError",
    "check_model",
    "load",
    "predictor_fingerprint",
    "save",
    "shipped_predictor_for",
    "shipped_predictor_path",
    "shipped_predictors",
]

FORMAT_VERSION = 2
_TENSORS = "predictor.safetensors"
_META = "predictor.json"
_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "model_type")


class PredictorFileError(ValueError):
    """A predictor file is missing, malformed, corrupted or made for another model."""


# --------------------------------------------------------------------------- shipped predictors


def _data_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


def shipped_predictor_path(model_name: str = "smollm2-135m") -> Path:
    """Folder of the predictor shipped in the package for an embedded model."""
    return _data_dir() / f"predictor-{model_name}"


@functools.lru_cache(maxsize=1)
def shipped_predictors() -> dict[str, dict]:
    """``{embedded model name: fingerprint}`` of the predictors shipped in the package (read
    once per process; folders of another format version are skipped)."""
    out = {}
    for folder in sorted(_data_dir().glob("predictor-*")):
        try:
            meta = json.loads((folder / _META).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("format_version") == FORMAT_VERSION:
            out[folder.name.removeprefix("predictor-")] = meta.get("fingerprint") or {}
    return out


def shipped_predictor_for(model=None, *, vocab_size: int | None = None) -> Path:
    """The shipped predictor of ``model`` (a model, or a config with ``vocab_size`` etc.), or of
    the only embedded model with ``vocab_size``; :class:`PredictorFileError` if there is none."""
    shipped = shipped_predictors()
    if not shipped:
        raise PredictorFileError(
            f"no predictor of format version {FORMAT_VERSION} is shipped in {_data_dir()}; "
            "train one with `entcal train --model NAME --out DIR` and use "
            "calibrated:predictor=DIR/predictor"
        )
    if model is not None:
        current = _fingerprint_of(model)
        for name, fp in shipped.items():
            if not _mismatch(fp, current):
                return shipped_predictor_path(name)
        what = current.get("name") or current.get("model_type")
        raise PredictorFileError(
            f"no predictor is shipped for model {what!r} (shipped: {', '.join(shipped)}); "
            "train one with `entcal train --model NAME --out DIR` and use "
            "calibrated:predictor=DIR/predictor"
        )
    names = [n for n, fp in shipped.items() if fp.get("vocab_size") == vocab_size]
    if len(names) != 1:
        listed = ", ".join(f"{n} (vocab {fp.get('vocab_size')})" for n, fp in shipped.items())
        raise PredictorFileError(
            f"cannot tell which shipped predictor fits logits of {vocab_size} columns "
            f"(shipped: {listed}); "
            "bind the decoder to the model (decoder.bind(model)) or pass predictor=PATH"
        )
    return shipped_predictor_path(names[0])


# --------------------------------------------------------------------------- fingerprints


def _lm_head_digest(model) -> list[float] | None:
    head = getattr(model, "get_output_embeddings", None)
    if head is None or head() is None:
        return None
    w = head().weight.detach().float()
    # Cheap statistics that differ between any two trained models of the same shape.
    return [
        round(float(w.mean()), 7),
        round(float(w.std()), 7),
        round(float(w[: min(256, w.shape[0])].abs().mean()), 7),
    ]


def _fingerprint_of(model) -> dict:
    """Config fields (and the LM-head digest when weights are at hand) of a model or config."""
    config = getattr(model, "config", model)
    text = getattr(config, "text_config", None)
    fp: dict[str, Any] = {}
    for key in _CONFIG_KEYS:
        value = getattr(config, key, None)
        if value is None and text is not None:
            value = getattr(text, key, None)
        fp[key] = value
    fp["name"] = getattr(config, "_name_or_path", None)
    head = getattr(model, "get_output_embeddings", None)
    if head is not None and head() is not None:  # the logits' width (may exceed the config's)
        fp["vocab_size"] = int(head().weight.shape[0])
    fp["lm_head_digest"] = _lm_head_digest(model)
    return fp


def predictor_fingerprint(model, name: str | None = None) -> dict:
    """``entcal.models.fingerprint`` plus a digest of the LM-head weights."""
    from entcal.models import fingerprint

    fp = fingerprint(model, name)
    fp["lm_head_digest"] = _lm_head_digest(model)
    return fp


def _mismatch(saved: dict, current: dict) -> str | None:
    """Why ``saved`` (a predictor's fingerprint) does not fit ``current``, or None."""
    for key in _CONFIG_KEYS:
        if current.get(key) is not None and saved.get(key) != current.get(key):
            return f"{key}={saved.get(key)!r}, but this model has {key}={current.get(key)!r}"
    a, b = saved.get("lm_head_digest"), current.get("lm_head_digest")
    if (
        a is not None
        and b is not None
        and not all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a, b))
    ):
        return f"its LM-head weights differ from this model's (digest {a} vs {b})"
    return None


def check_model(saved: dict, model, where: Any) -> None:
    """Raise :class:`PredictorFileError` unless ``model`` (a model or its config) is the one
    whose fingerprint ``saved`` a predictor (at ``where``, for the message) was fitted for."""
    why = _mismatch(saved, _fingerprint_of(model))
    if why:
        raise PredictorFileError(
            f"predictor {where} was fitted for model {saved.get('name')!r}: {why}; train one "
            "for this model with `entcal train --model NAME --out DIR`"
        )


# --------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_gate(gate: Any, what: str) -> dict:
    """The gate as plain JSON (``threshold``, ``strength`` per bucket, ``bucket_edges``,
    ``base``, ``warmup``; files written before the base or the warm-up existed read them as 0;
    ``lift`` and ``reference_level``, only where the file has them: no lift reads as 0).

    Raises ``ValueError`` (naming ``what``) unless there are ``len(bucket_edges) + 1`` finite
    strengths ``≥ 0``, increasing edges, a finite threshold, a finite base ``≥ 0``, an integer
    warm-up ``≥ 0``, a lift in ``[0, 1]`` and, with a lift above 0, a finite reference level.
    """
    if not isinstance(gate, dict):
        raise ValueError(f"{what} must be a dict with threshold, strength and bucket_edges")
    try:
        c = float(gate["threshold"])
        g = [float(x) for x in gate["strength"]]
        edges = [int(e) for e in gate["bucket_edges"]]
        base = float(gate.get("base", 0.0))
        warmup = gate.get("warmup", 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what} lacks or garbles {exc}") from None
    if len(g) != len(edges) + 1 or not all(math.isfinite(x) and x >= 0 for x in g):
        raise ValueError(f"{what}: needs len(bucket_edges) + 1 strengths >= 0, got {g}")
    if edges != sorted(set(edges)) or not math.isfinite(c):
        raise ValueError(f"{what}: bucket_edges must increase and threshold be finite")
    if not (math.isfinite(base) and base >= 0):
        raise ValueError(f"{what}: base must be finite and >= 0, got {base}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"{what}: warmup must be an integer >= 0, got {warmup!r}")
    out = {"threshold": c, "strength": g, "bucket_edges": edges, "base": base, "warmup": warmup}
    for key in ("lift", "reference_level"):
        if key in gate:
            value = gate[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{what}: {key} must be a number, got {value!r}")
            out[key] = float(value)
    if not 0.0 <= out.get("lift", 0.0) <= 1.0:
        raise ValueError(f"{what}: lift must lie in [0, 1], got {out['lift']}")
    if "reference_level" in out and not math.isfinite(out["reference_level"]):
        raise ValueError(f"{what}: reference_level must be finite, got {out['reference_level']}")
    if out.get("lift", 0.0) > 0 and "reference_level" not in out:
        raise ValueError(
            f"{what}: a lift of {out['lift']} needs a finite reference_level, got "
            f"{gate.get('reference_level')!r}"
        )
    return out


def save(pred: FutureEntropyPredictor, path: str | Path, fingerprint: dict | None = None) -> Path:
    """Write ``path/predictor.safetensors`` and ``path/predictor.json``; returns the folder.

    ``pred`` must be fitted and carry ``projection_`` and ``gate_`` (``ValueError`` otherwise);
    ``fingerprint`` (:func:`predictor_fingerprint`) replaces the one in ``pred.meta_``. The
    tensor file is written first and the JSON (which records its SHA-256) last, each through a
    temporary file and a rename, so an interrupted save never leaves a pair that loads.
    """
    from safetensors.torch import save_file

    proj = getattr(pred, "projection_", None)
    if proj is None:
        raise ValueError("set projection_ (the model's hidden-state projection) before saving")
    gate = _check_gate(getattr(pred, "gate_", None), "gate_")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"weights.{k}": v.contiguous() for k, v in pred.weights_.items()}
    tensors["x_mean"] = torch.as_tensor(pred.x_mean_, dtype=torch.float32)
    tensors["x_scale"] = torch.as_tensor(pred.x_scale_, dtype=torch.float32)
    tensors["projection.tokens"] = proj.tokens.to(torch.int64).contiguous()
    tensors["projection.matrix"] = proj.matrix.float().contiguous()
    tensors["projection.offset"] = proj.offset.float().contiguous()
    tmp = folder / (_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "entcal-predictor"})
    tmp.chmod(0o644)  # safetensors writes 0600; package data must be readable
    tmp.replace(folder / _TENSORS)
    meta = dict(getattr(pred, "meta_", {}))
    if fingerprint is not None:
        meta["fingerprint"] = fingerprint
    meta.update(
        {
            "format_version": FORMAT_VERSION,
            "kind": pred.kind_,
            "feature_names": feature_names(proj.dim),
            "y_mean": pred.y_mean_,
            "y_scale": pred.y_scale_,
            "scores": pred.scores_,
            "gate": gate,
            "sha256": _sha256(folder / _TENSORS),
        }
    )
    tmp = folder / (_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
    tmp.replace(folder / _META)
    return folder


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a folder, the format version and the checksum checked."""
    from safetensors import safe_open

    meta_path, tensor_path = folder / _META, folder / _TENSORS
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"predictor file {p} does not exist (a predictor is a folder holding "
                f"{_META} and {_TENSORS}, written by `entcal train`)"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictorFileError(f"predictor file {meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise PredictorFileError(
            f"predictor file {meta_path} is not an entcal predictor of format version "
            f"{FORMAT_VERSION} (found {found!r}); retrain it with `entcal train`"
        )
    if _sha256(tensor_path) != meta.get("sha256"):
        raise PredictorFileError(
            f"predictor tensors {tensor_path} are truncated or corrupted (SHA-256 differs "
            f"from the one recorded in {meta_path})"
        )
    try:
        with safe_open(str(tensor_path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise PredictorFileError(
            f"predictor tensors {tensor_path} are unreadable ({exc})"
        ) from None
    return meta, tensors


def load(path: str | Path, model=None, fingerprint: dict | None = None) -> dict[str, Any]:
    """The learned attributes of a saved predictor (a folder, or the path of a file in it).

    Returns ``{attribute name: value}`` for ``kind_``, ``x_mean_``, ``x_scale_`` (float64
    arrays ``(F,)``), ``weights_`` (float32 tensors), ``projection_``, ``y_mean_``,
    ``y_scale_``, ``gate_``, ``scores_``, ``meta_`` (the JSON) and ``path_`` (the folder);
    :meth:`FutureEntropyPredictor.load <entcal.calibrators.predictor.FutureEntropyPredictor.load>`
    sets them on a new estimator. With ``model`` (a model or its config) or a ``fingerprint``
    dict, the model it was fitted for must match. Raises ``FileNotFoundError`` for a missing
    file and :class:`PredictorFileError` for a malformed, truncated or corrupted one or a model
    mismatch. Never unpickles.
    """
    folder = Path(path).expanduser()
    if folder.name in (_META, _TENSORS):
        folder = folder.parent
    meta, tensors = _read(folder)
    kind = meta.get("kind")
    try:
        state: dict[str, Any] = {
            "kind_": kind,
            "x_mean_": tensors["x_mean"].numpy().astype(np.float64),
            "x_scale_": tensors["x_scale"].numpy().astype(np.float64),
            "weights_": {
                k.split(".", 1)[1]: v.float()
                for k, v in tensors.items()
                if k.startswith("weights.")
            },
            "projection_": HiddenProjection(
                tensors["projection.tokens"].long(),
                tensors["projection.matrix"].float(),
                tensors["projection.offset"].float(),
            ),
            "y_mean_": float(meta["y_mean"]),
            "y_scale_": float(meta["y_scale"]),
        }
        gate = meta["gate"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PredictorFileError(f"predictor {folder} lacks or garbles {exc}") from None
    try:
        state["gate_"] = _check_gate(gate, f"predictor {folder}: gate")
    except ValueError as exc:
        raise PredictorFileError(str(exc)) from None
    _check_tensors(folder, state, (meta.get("fingerprint") or {}).get("vocab_size"))
    state["scores_"] = meta.get("scores", {})
    state["meta_"] = meta
    state["path_"] = folder
    saved_fp = meta.get("fingerprint") or {}
    if model is not None:
        check_model(saved_fp, model, folder)
    elif fingerprint is not None:
        why = _mismatch(saved_fp, fingerprint)
        if why:
            raise PredictorFileError(
                f"predictor {folder} was fitted for {saved_fp.get('name')!r} ({why})"
            )
    return state


def _check_tensors(folder: Path, state: dict[str, Any], vocab: int | None) -> None:
    """:class:`PredictorFileError` unless the loaded arrays have the shapes the kind and the
    projection imply, hold finite values and positive scales, and index the vocabulary."""
    kind, weights, proj = state["kind_"], state["weights_"], state["projection_"]
    x_mean, x_scale = state["x_mean_"], state["x_scale_"]
    n_feat = len(feature_names(proj.dim))
    expected = {"ridge": {"coef": (n_feat,)}, "mlp": {"w0": (n_feat, -1)}}.get(kind)
    if expected is None:
        raise PredictorFileError(f"predictor {folder} has unknown kind {kind!r}")
    for name, shape in expected.items():
        got = tuple(weights.get(name, torch.empty(0)).shape)
        if len(got) != len(shape) or any(s not in (-1, g) for s, g in zip(shape, got)):
            raise PredictorFileError(f"predictor {folder}: weights.{name} has shape {got}")
    if x_mean.shape != (n_feat,) or x_scale.shape != (n_feat,):
        raise PredictorFileError(f"predictor {folder}: x_mean has shape {x_mean.shape}")
    if proj.matrix.shape != (proj.dim, proj.tokens.shape[0]) or proj.offset.shape != (proj.dim,):
        raise PredictorFileError(f"predictor {folder}: projection tensors do not fit together")
    arrays = (*weights.values(), proj.matrix, proj.offset)
    if not (
        all(bool(torch.isfinite(v).all()) for v in arrays)
        and np.isfinite(x_mean).all()
        and (x_scale > 0).all()
        and np.isfinite(x_scale).all()
        and math.isfinite(state["y_mean_"])
        and math.isfinite(state["y_scale_"])
    ):
        raise PredictorFileError(
            f"predictor {folder}: weights, scales or offsets hold NaN, inf or a zero scale"
        )
    if vocab is not None and int(proj.tokens.max()) >= vocab:
        raise PredictorFileError(f"predictor {folder}: projection tokens exceed the vocabulary")
