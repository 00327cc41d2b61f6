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

A scikit-learn-style estimator: fitted with scikit-learn (ridge, or a one-hidden-layer MLP if it
beats ridge on held-out documents), exported as torch tensors and applied by the pure functions
of :mod:`entcal.calibrators.derailment`. Saved as a folder with ``predictor.safetensors`` and
``predictor.json`` (:mod:`entcal.calibrators.predictor_file`: the format, its checksum, the
fingerprint of the model it was fitted for, the shipped predictors); loading never unpickles.

Example::

    >>> import numpy as np
    >>> from entcal.calibrators.predictor_file import shipped_predictor_path
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

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from entcal.calibrators import predictor_file
from entcal.calibrators.derailment import excess_entropy_rate, fold_standardization
from entcal.calibrators.state import HiddenProjection

__all__ = ["FutureEntropyPredictor"]


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def _quiet_fit(est, X, y):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _export(kind: str, est) -> dict[str, Tensor]:
    """A fitted scikit-learn ``Ridge`` or ``MLPRegressor`` as float32 tensors (the names of
    :data:`entcal.calibrators.derailment.WEIGHT_NAMES`)."""
    if kind == "ridge":
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


class FutureEntropyPredictor:
    """Predicts the excess future entropy rate ``D`` (nats/token) of a generation from its state.

    Hyper-parameters (stored as given; checked by :meth:`fit`, which raises ``ValueError``):

    Args:
        estimator: ``"auto"`` (ridge, or the MLP if it beats ridge's held-out R² by more than
            0.02), ``"ridge"`` or ``"mlp"``.
        ridge_alpha: L2 strength of the ridge model (on standardized features), finite ``≥ 0``.
        hidden: width of the MLP's hidden layer, an integer ``≥ 1``.
        heldout_fraction: share of documents held out to score the estimators, in ``(0, 1)``.
        random_state: seed of the split and the MLP.

    Learned by :meth:`fit` (or read by :meth:`load`): ``kind_`` (``"ridge"`` or ``"mlp"``),
    ``x_mean_``, ``x_scale_`` (feature standardization, ``(F,)``), ``y_mean_``, ``y_scale_``
    (label standardization, nats/token), ``weights_`` (the chosen model as float32 tensors),
    ``scores_`` (held-out R²). Attached by the training recipe before :meth:`save` (they are not
    learned from ``X, y``), and read by :meth:`load`: ``projection_``
    (:class:`~entcal.calibrators.state.HiddenProjection` of the model), ``gate_`` (the fitted
    rule ``α = α_0 + g_b·max(0, D − c)``: ``{"threshold": c, "strength": [g_0, …, g_B],
    "bucket_edges": [e_1, …, e_B], "base": α_0}``, bucket ``b`` holding positions
    ``e_b ≤ t < e_{b+1}``) and
    ``meta_`` (JSON-able training information); :meth:`load` also sets ``path_``.
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

    def _validate_params(self) -> None:
        """``ValueError`` for a hyper-parameter out of range (those the estimator will use)."""
        if self.estimator not in ("auto", "ridge", "mlp"):
            raise ValueError(f"estimator must be 'auto', 'ridge' or 'mlp', got {self.estimator!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")
        if self.estimator != "mlp" and not (
            isinstance(self.ridge_alpha, numbers.Real)
            and math.isfinite(self.ridge_alpha)
            and self.ridge_alpha >= 0
        ):
            raise ValueError(f"ridge_alpha must be a finite number >= 0, got {self.ridge_alpha!r}")
        if self.estimator != "ridge" and not (
            isinstance(self.hidden, numbers.Integral)
            and not isinstance(self.hidden, bool)
            and self.hidden >= 1
        ):
            raise ValueError(f"hidden must be an integer >= 1, got {self.hidden!r}")

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
        ``self``. Raises ``ValueError`` for bad hyper-parameters, shapes or non-finite values.
        """
        self._validate_params()
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be (n, F) and y (n,), got {X.shape} and {y.shape}")
        if not (np.isfinite(X).all() and np.isfinite(y).all()):
            raise ValueError("X and y must be finite")
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        x_mean = X.mean(0)
        x_scale = np.where(X.std(0) > 1e-12, X.std(0), 1.0)
        y_mean = float(y.mean())
        y_scale = float(y.std()) or 1.0
        Xs = (X - x_mean) / x_scale
        ys = (y - y_mean) / y_scale

        from sklearn.model_selection import GroupShuffleSplit

        split = GroupShuffleSplit(
            1, test_size=self.heldout_fraction, random_state=self.random_state
        )
        tr, te = next(split.split(Xs, ys, groups))
        kinds = ["ridge", "mlp"] if self.estimator == "auto" else [self.estimator]
        scores: dict[str, Any] = {"n_train": len(tr), "n_heldout": len(te)}
        for kind in kinds:
            est = _quiet_fit(self._make(kind, len(tr)), Xs[tr], ys[tr])
            pred = est.predict(Xs[te]) * y_scale + y_mean
            scores[kind] = {"r2_heldout": _r2(y[te], pred)}
        chosen = kinds[0]
        if len(kinds) == 2 and scores["mlp"]["r2_heldout"] > scores["ridge"]["r2_heldout"] + 0.02:
            chosen = "mlp"
        scores["chosen"] = chosen
        scores["r2_heldout"] = scores[chosen]["r2_heldout"]
        est = _quiet_fit(self._make(chosen, len(ys)), Xs, ys)
        self._device_cache = None
        self.x_mean_, self.x_scale_, self.y_mean_, self.y_scale_ = x_mean, x_scale, y_mean, y_scale
        self.kind_ = chosen
        self.weights_ = _export(chosen, est)
        self.scores_ = scores
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "weights_")

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(
                "this FutureEntropyPredictor is not fitted yet: call fit(X, y) or use "
                "FutureEntropyPredictor.load(folder)"
            )

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted ``D`` (nats/token) for feature rows ``X (n, F)`` (via the torch path).

        Raises ``sklearn.exceptions.NotFittedError`` before :meth:`fit` or :meth:`load`.
        """
        self._check_fitted()
        out = self.predict_tensor(torch.as_tensor(np.asarray(X), dtype=torch.float32))
        return out.double().numpy()

    # ------------------------------------------------------------------ torch side

    def _on(self, device: torch.device) -> tuple[dict[str, Tensor], HiddenProjection | None]:
        """``(weights with the standardization folded in, projection)`` on ``device`` (cached)."""
        self._check_fitted()
        cache = getattr(self, "_device_cache", None)
        proj = getattr(self, "projection_", None)
        key = (device, id(self.weights_), id(proj))
        if cache is None or cache[0] != key:
            folded = fold_standardization(
                {k: v.to(device) for k, v in self.weights_.items()},
                torch.as_tensor(self.x_mean_, dtype=torch.float32, device=device),
                torch.as_tensor(self.x_scale_, dtype=torch.float32, device=device),
            )
            self._device_cache = (key, folded, proj.to(device) if proj is not None else None)
        return self._device_cache[1], self._device_cache[2]

    def predict_tensor(self, features: Tensor) -> Tensor:
        """``D`` for features ``(..., F)`` as a torch op, ``(...)`` float32 (same numbers as
        :meth:`predict`; :func:`~entcal.calibrators.derailment.excess_entropy_rate`)."""
        weights, _ = self._on(features.device)
        return excess_entropy_rate(features, weights, self.y_mean_, self.y_scale_)

    def projection_on(self, device: torch.device) -> HiddenProjection:
        """The hidden-state projection, on ``device``."""
        _, proj = self._on(device)
        if proj is None:
            raise ValueError("the predictor has no hidden-state projection; set projection_")
        return proj

    @property
    def vocab_size(self) -> int | None:
        fp = getattr(self, "meta_", {}).get("fingerprint") or {}
        return fp.get("vocab_size")

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path, fingerprint: dict | None = None) -> Path:
        """Write ``path/predictor.safetensors`` and ``path/predictor.json``; returns the folder
        (:func:`entcal.calibrators.predictor_file.save`; ``ValueError`` without ``projection_``
        or a valid ``gate_``)."""
        self._check_fitted()
        return predictor_file.save(self, path, fingerprint)

    @classmethod
    def load(
        cls, path: str | Path, model=None, fingerprint: dict | None = None
    ) -> FutureEntropyPredictor:
        """A fitted predictor from a saved folder (or the path of its ``predictor.json``).

        With ``model`` (a model or its config) or a ``fingerprint`` dict, the model it was fitted
        for must match. Raises ``FileNotFoundError`` for a missing file and
        :class:`~entcal.calibrators.predictor_file.PredictorFileError` for a malformed, truncated
        or corrupted one or a model mismatch (:func:`entcal.calibrators.predictor_file.load`).
        Never unpickles.
        """
        state = predictor_file.load(path, model=model, fingerprint=fingerprint)
        self = cls(estimator=state["kind_"])
        vars(self).update(state)
        return self

    def check_model(self, model) -> None:
        """Raise :class:`~entcal.calibrators.predictor_file.PredictorFileError` unless ``model``
        (or its config) is the one this predictor was fitted for."""
        saved = self.meta_.get("fingerprint") or {}
        predictor_file.check_model(saved, model, getattr(self, "path_", "<in memory>"))
