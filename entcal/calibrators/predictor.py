"""``FutureEntropyPredictor``: how far a generation's future entropy will exceed the human level.

The predictor maps the state of a generation at step ``t`` (:mod:`entcal.calibrators.state`:
entropy and its moving averages relative to the first generated steps, moving averages of the
final hidden state read back from the logits row) to the **excess future entropy rate**

    D(t) = mean_{s = t+1 .. t+K} H_s  −  L_human,

the mean raw next-token entropy of the next ``K`` steps of the text being produced, minus the
model's log loss on the human continuation of the same prompt (nats/token). On human text D ≈ 0;
where a sampled generation has derailed (Cao, Valiant & Liang, arXiv 2511.11966, §4: entropy
rises with the generation's length) D is large. The calibrated decoder
(:mod:`entcal.calibrators.calibrated`) sharpens the next-token distribution only where the
predicted D exceeds a threshold.

Fitted with scikit-learn (ridge, or a one-hidden-layer MLP if it beats ridge on held-out
documents), applied as torch matrix products. Saved as a folder with ``predictor.safetensors``
(weights, the hidden-state projection) and ``predictor.json`` (kind, feature names, gate,
training report, the fingerprint of the model it was fitted for, the SHA-256 of the tensors).
Loading never unpickles; a missing, truncated or corrupted file, or one fitted for another model,
raises a clear error before any generation.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(600, 4)); y = X @ [0.5, -1.0, 0.0, 0.2] + 0.1 * rng.normal(size=600)
    >>> pred = FutureEntropyPredictor(estimator="ridge").fit(X, y, groups=np.arange(600) // 30)
    >>> round(pred.scores_["r2_heldout"], 2)    # documents of 30 rows kept on one side
    0.99
    >>> shipped = FutureEntropyPredictor.load(shipped_predictor_path("smollm2-135m"))
    >>> shipped.kind_, shipped.gate_["bucket_edges"]
    ('ridge', [64, 128, 192])

``entcal train`` sets ``projection_`` and ``gate_`` on a fitted predictor and saves it with
``pred.save(folder, fingerprint=predictor_fingerprint(model, name))``; ``load(folder,
model=model)`` checks that fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from entcal.calibrators.state import HiddenProjection, feature_names

__all__ = [
    "FORMAT_VERSION",
    "FutureEntropyPredictor",
    "PredictorFileError",
    "predictor_fingerprint",
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def _quiet_fit(est, X, y):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _check_gate(gate: Any, what: str) -> dict:
    """The gate as plain JSON (``threshold``, ``strength`` per bucket, ``bucket_edges``)."""
    if not isinstance(gate, dict):
        raise ValueError(f"{what} must be a dict with threshold, strength and bucket_edges")
    try:
        c = float(gate["threshold"])
        g = [float(x) for x in gate["strength"]]
        edges = [int(e) for e in gate["bucket_edges"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what} lacks or garbles {exc}") from None
    if len(g) != len(edges) + 1 or not all(math.isfinite(x) and x >= 0 for x in g):
        raise ValueError(f"{what}: needs len(bucket_edges) + 1 strengths >= 0, got {g}")
    if edges != sorted(set(edges)) or not math.isfinite(c):
        raise ValueError(f"{what}: bucket_edges must increase and threshold be finite")
    return {"threshold": c, "strength": g, "bucket_edges": edges}


# --------------------------------------------------------------------------- the predictor


class FutureEntropyPredictor:
    """Predicts the excess future entropy rate ``D`` (nats/token) of a generation from its state.

    Args:
        estimator: ``"auto"`` (ridge, or the MLP if it beats ridge's held-out R² by more than
            0.02), ``"ridge"`` or ``"mlp"``.
        ridge_alpha: L2 strength of the ridge model (on standardized features).
        hidden: width of the MLP's hidden layer.
        heldout_fraction: share of documents held out to score the estimators.
        random_state: seed of the split and the MLP.

    Attributes (set by ``fit`` or ``load``): ``kind_``, ``x_mean_``, ``x_scale_``, ``y_mean_``,
    ``y_scale_``, ``weights_`` (torch tensors), ``scores_`` (held-out R²). Set by the training
    recipe before ``save``: ``projection_`` (:class:`~entcal.calibrators.state.HiddenProjection`
    of the model), ``gate_`` (the fitted rule ``α = g_b·max(0, D − c)``: ``{"threshold": c, "strength":
    [g_0, …, g_B], "bucket_edges": [e_1, …, e_B]}``, bucket ``b`` holding positions
    ``e_b ≤ t < e_{b+1}``) and ``meta_`` (JSON-able training information).
    """

    def __init__(
        self,
        estimator: str = "auto",
        ridge_alpha: float = 10.0,
        hidden: int = 32,
        heldout_fraction: float = 0.2,
        random_state: int = 0,
    ) -> None:
        self.estimator = estimator
        self.ridge_alpha = ridge_alpha
        self.hidden = hidden
        self.heldout_fraction = heldout_fraction
        self.random_state = random_state

    # ------------------------------------------------------------------ scikit-learn side

    def _make(self, kind: str, n: int):
        if kind == "ridge":
            from sklearn.linear_model import Ridge

            return Ridge(alpha=self.ridge_alpha)
        from sklearn.neural_network import MLPRegressor

        return MLPRegressor(
            hidden_layer_sizes=(self.hidden,),
            activation="relu",
            alpha=1e-3,
            learning_rate_init=3e-3,
            max_iter=200,
            early_stopping=n >= 500,
            n_iter_no_change=10,
            random_state=self.random_state,
        )

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None):
        """Fit on state features ``X (n, F)`` and labels ``y (n,)`` (nats/token).

        ``groups`` (document ids) keep a document on one side of the held-out split. Returns
        ``self``. Raises ``ValueError`` for bad parameters, shapes or non-finite values.
        """
        if self.estimator not in ("auto", "ridge", "mlp"):
            raise ValueError(f"estimator must be 'auto', 'ridge' or 'mlp', got {self.estimator!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be (n, F) and y (n,), got {X.shape} and {y.shape}")
        if not (np.isfinite(X).all() and np.isfinite(y).all()):
            raise ValueError("X and y must be finite")
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        self.x_mean_ = X.mean(0)
        self.x_scale_ = np.where(X.std(0) > 1e-12, X.std(0), 1.0)
        self.y_mean_ = float(y.mean())
        self.y_scale_ = float(y.std()) or 1.0
        Xs = (X - self.x_mean_) / self.x_scale_
        ys = (y - self.y_mean_) / self.y_scale_

        from sklearn.model_selection import GroupShuffleSplit

        split = GroupShuffleSplit(
            1, test_size=self.heldout_fraction, random_state=self.random_state
        )
        tr, te = next(split.split(Xs, ys, groups))
        kinds = ["ridge", "mlp"] if self.estimator == "auto" else [self.estimator]
        scores: dict[str, Any] = {"n_train": len(tr), "n_heldout": len(te)}
        for kind in kinds:
            est = _quiet_fit(self._make(kind, len(tr)), Xs[tr], ys[tr])
            pred = est.predict(Xs[te]) * self.y_scale_ + self.y_mean_
            scores[kind] = {"r2_heldout": _r2(y[te], pred)}
        chosen = kinds[0]
        if len(kinds) == 2 and scores["mlp"]["r2_heldout"] > scores["ridge"]["r2_heldout"] + 0.02:
            chosen = "mlp"
        scores["chosen"] = chosen
        scores["r2_heldout"] = scores[chosen]["r2_heldout"]
        est = _quiet_fit(self._make(chosen, len(ys)), Xs, ys)
        self._device_cache = None
        self.kind_ = chosen
        self.weights_ = self._export(est)
        self.scores_ = scores
        return self

    def _export(self, est) -> dict[str, Tensor]:
        if self.kind_ == "ridge":
            return {
                "coef": torch.tensor(np.asarray(est.coef_), dtype=torch.float32),
                "intercept": torch.tensor([float(est.intercept_)], dtype=torch.float32),
            }
        return {
            "w0": torch.tensor(est.coefs_[0], dtype=torch.float32),
            "b0": torch.tensor(est.intercepts_[0], dtype=torch.float32),
            "w1": torch.tensor(est.coefs_[1][:, 0], dtype=torch.float32),
            "b1": torch.tensor([float(est.intercepts_[1][0])], dtype=torch.float32),
        }

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted ``D`` (nats/token) for feature rows ``X (n, F)`` (via the torch path)."""
        out = self.predict_tensor(torch.as_tensor(np.asarray(X), dtype=torch.float32))
        return out.double().numpy()

    # ------------------------------------------------------------------ torch side

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        cache = getattr(self, "_device_cache", None)
        proj = getattr(self, "projection_", None)
        key = (device, id(self.weights_), id(proj))
        if cache is None or cache[0] != key:
            t = {k: v.to(device) for k, v in self.weights_.items()}
            # fold the standardization into the first layer: (x − m)/s · W = x·(W/s) − (m/s)·W
            mean = torch.as_tensor(self.x_mean_, dtype=torch.float32, device=device)
            inv = 1.0 / torch.as_tensor(self.x_scale_, dtype=torch.float32, device=device)
            first = "coef" if self.kind_ == "ridge" else "w0"
            bias = "intercept" if self.kind_ == "ridge" else "b0"
            w = t[first] * (inv if t[first].ndim == 1 else inv[:, None])
            t[bias] = t[bias] - (mean @ w if w.ndim == 2 else (mean * w).sum().reshape(1))
            t[first] = w
            t["projection"] = proj.to(device) if proj is not None else None
            self._device_cache = (key, t)
        return self._device_cache[1]

    def predict_tensor(self, features: Tensor) -> Tensor:
        """``D`` for features ``(..., F)`` as a torch op (same numbers as :meth:`predict`)."""
        t = self._tensors(features.device)
        x = features.float()
        if self.kind_ == "ridge":
            out = x @ t["coef"] + t["intercept"]
        else:
            out = torch.relu(x @ t["w0"] + t["b0"]) @ t["w1"] + t["b1"]
        return out * self.y_scale_ + self.y_mean_

    def projection_on(self, device: torch.device) -> HiddenProjection:
        """The hidden-state projection, on ``device``."""
        proj = self._tensors(device)["projection"]
        if proj is None:
            raise ValueError("the predictor has no hidden-state projection; set projection_")
        return proj

    @property
    def vocab_size(self) -> int | None:
        fp = getattr(self, "meta_", {}).get("fingerprint") or {}
        return fp.get("vocab_size")

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path, fingerprint: dict | None = None) -> Path:
        """Write ``path/predictor.safetensors`` and ``path/predictor.json``; returns the folder.

        The tensor file is written first and the JSON (which records its SHA-256) last, each
        through a temporary file and a rename, so an interrupted save never leaves a pair that
        loads.
        """
        from safetensors.torch import save_file

        proj = getattr(self, "projection_", None)
        if proj is None:
            raise ValueError("set projection_ (the model's hidden-state projection) before saving")
        gate = _check_gate(getattr(self, "gate_", None), "gate_")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"weights.{k}": v.contiguous() for k, v in self.weights_.items()}
        tensors["x_mean"] = torch.as_tensor(self.x_mean_, dtype=torch.float32)
        tensors["x_scale"] = torch.as_tensor(self.x_scale_, dtype=torch.float32)
        tensors["projection.tokens"] = proj.tokens.to(torch.int64).contiguous()
        tensors["projection.matrix"] = proj.matrix.float().contiguous()
        tensors["projection.offset"] = proj.offset.float().contiguous()
        tmp = folder / (_TENSORS + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "entcal-predictor"})
        tmp.chmod(0o644)  # safetensors writes 0600; package data must be readable
        tmp.replace(folder / _TENSORS)
        meta = dict(getattr(self, "meta_", {}))
        if fingerprint is not None:
            meta["fingerprint"] = fingerprint
        meta.update(
            {
                "format_version": FORMAT_VERSION,
                "kind": self.kind_,
                "feature_names": feature_names(proj.dim),
                "y_mean": self.y_mean_,
                "y_scale": self.y_scale_,
                "scores": self.scores_,
                "gate": gate,
                "sha256": _sha256(folder / _TENSORS),
            }
        )
        self.meta_ = meta
        tmp = folder / (_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
        tmp.replace(folder / _META)
        return folder

    @classmethod
    def load(
        cls, path: str | Path, model=None, fingerprint: dict | None = None
    ) -> FutureEntropyPredictor:
        """Load a saved predictor (a folder, or the path of its ``predictor.json``).

        With ``model`` (a model or its config) or a ``fingerprint`` dict, the model it was fitted
        for must match. Raises ``FileNotFoundError`` for a missing file and
        :class:`PredictorFileError` for a malformed, truncated or corrupted one or a model
        mismatch. Never unpickles.
        """
        from safetensors import safe_open

        folder = Path(path).expanduser()
        if folder.name in (_META, _TENSORS):
            folder = folder.parent
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
            raise PredictorFileError(
                f"predictor file {meta_path} is not valid JSON ({exc})"
            ) from None
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
        self = cls(estimator=meta.get("kind", "ridge"))
        self.kind_ = meta.get("kind")
        try:
            self.x_mean_ = tensors["x_mean"].numpy().astype(np.float64)
            self.x_scale_ = tensors["x_scale"].numpy().astype(np.float64)
            self.weights_ = {
                k.split(".", 1)[1]: v.float()
                for k, v in tensors.items()
                if k.startswith("weights.")
            }
            self.projection_ = HiddenProjection(
                tensors["projection.tokens"].long(),
                tensors["projection.matrix"].float(),
                tensors["projection.offset"].float(),
            )
            self.y_mean_ = float(meta["y_mean"])
            self.y_scale_ = float(meta["y_scale"])
            gate = meta["gate"]
        except (KeyError, TypeError, ValueError) as exc:
            raise PredictorFileError(f"predictor {folder} lacks or garbles {exc}") from None
        try:
            self.gate_ = _check_gate(gate, f"predictor {folder}: gate")
        except ValueError as exc:
            raise PredictorFileError(str(exc)) from None
        n_feat = len(feature_names(self.projection_.dim))
        expected = {"ridge": {"coef": (n_feat,)}, "mlp": {"w0": (n_feat, -1)}}.get(self.kind_)
        if expected is None:
            raise PredictorFileError(f"predictor {folder} has unknown kind {self.kind_!r}")
        for name, shape in expected.items():
            got = tuple(self.weights_.get(name, torch.empty(0)).shape)
            if len(got) != len(shape) or any(s not in (-1, g) for s, g in zip(shape, got)):
                raise PredictorFileError(f"predictor {folder}: weights.{name} has shape {got}")
        if self.x_mean_.shape != (n_feat,) or self.x_scale_.shape != (n_feat,):
            raise PredictorFileError(f"predictor {folder}: x_mean has shape {self.x_mean_.shape}")
        proj = self.projection_
        if proj.matrix.shape != (proj.dim, proj.tokens.shape[0]) or proj.offset.shape != (
            proj.dim,
        ):
            raise PredictorFileError(f"predictor {folder}: projection tensors do not fit together")
        arrays = (*self.weights_.values(), proj.matrix, proj.offset)
        if not (
            all(bool(torch.isfinite(v).all()) for v in arrays)
            and np.isfinite(self.x_mean_).all()
            and (self.x_scale_ > 0).all()
            and np.isfinite(self.x_scale_).all()
            and math.isfinite(self.y_mean_)
            and math.isfinite(self.y_scale_)
        ):
            raise PredictorFileError(
                f"predictor {folder}: weights, scales or offsets hold NaN, inf or a zero scale"
            )
        self.scores_ = meta.get("scores", {})
        self.meta_ = meta
        saved_fp = meta.get("fingerprint") or {}
        vocab = saved_fp.get("vocab_size")
        if vocab is not None and int(proj.tokens.max()) >= vocab:
            raise PredictorFileError(f"predictor {folder}: projection tokens exceed the vocabulary")
        self.path_ = folder
        if model is not None:
            self.check_model(model)
        elif fingerprint is not None:
            why = _mismatch(saved_fp, fingerprint)
            if why:
                raise PredictorFileError(
                    f"predictor {folder} was fitted for {saved_fp.get('name')!r} ({why})"
                )
        return self

    def check_model(self, model) -> None:
        """Raise :class:`PredictorFileError` unless ``model`` (or its config) is the one this
        predictor was fitted for."""
        saved = self.meta_.get("fingerprint") or {}
        why = _mismatch(saved, _fingerprint_of(model))
        if why:
            where = getattr(self, "path_", "<in memory>")
            raise PredictorFileError(
                f"predictor {where} was fitted for model {saved.get('name')!r}: {why}; train one "
                "for this model with `entcal train --model NAME --out DIR`"
            )
