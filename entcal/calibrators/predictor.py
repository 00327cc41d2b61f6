"""``FutureEntropyPredictor``: Ĥ(prefix, v), fitted with scikit-learn, applied as torch tensors.

Fitting compares a ridge regression on the features of :mod:`entcal.calibrators.features` with a
one-hidden-layer MLP and keeps the one with the higher held-out R² (prefixes split into groups,
so a prefix never sits on both sides). Both re-express exactly as a few torch matrix products,
which is all that runs at sampling time, batched over the candidates of every row.

Saved as a folder holding ``predictor.safetensors`` (tensors) and ``predictor.json`` (kind,
feature names, α, training report, the model fingerprint and the SHA-256 of the tensor file).
Loading never unpickles; a missing, truncated or corrupted file, or one fitted for another model,
raises a clear error at load, before any generation.

Example::

    >>> pred = FutureEntropyPredictor().fit(X, y, groups=prefix_ids)
    >>> pred.scores_["chosen"], pred.scores_["r2_heldout"]
    >>> pred.save("out/predictor", fingerprint=predictor_fingerprint(model, "smollm2-135m"))
    >>> pred = FutureEntropyPredictor.load("out/predictor", model=model)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from entcal.calibrators.features import candidate_features, feature_names
from entcal.calibrators.ops import (
    COVER_MASS,
    adjusted_logprobs,
    check_alpha,
    cover_candidates,
    cover_mask,
    entropy_stats,
    fill_phi,
    fill_phi_dense,
)

__all__ = [
    "FORMAT_VERSION",
    "FutureEntropyPredictor",
    "PredictorFileError",
    "predictor_fingerprint",
    "shipped_predictor_path",
]

FORMAT_VERSION = 1
_TENSORS = "predictor.safetensors"
_META = "predictor.json"


class PredictorFileError(ValueError):
    """A predictor file is missing, malformed, corrupted or made for another model."""


def shipped_predictor_path(model_name: str = "smollm2-135m") -> Path:
    """Folder of the predictor shipped in the package for an embedded model."""
    return Path(__file__).resolve().parent.parent / "data" / f"predictor-{model_name}"


def _lm_head_digest(model) -> list[float]:
    w = model.get_output_embeddings().weight.detach().float()
    # Cheap statistics that differ between any two trained models of the same shape.
    return [
        round(float(w.mean()), 7),
        round(float(w.std()), 7),
        round(float(w[: min(256, w.shape[0])].abs().mean()), 7),
    ]


def predictor_fingerprint(model, name: str | None = None) -> dict:
    """``entcal.models.fingerprint`` plus a digest of the LM-head weights."""
    from entcal.models import fingerprint

    fp = fingerprint(model, name)
    fp["lm_head_digest"] = _lm_head_digest(model)
    return fp


def _check_fingerprint(saved: dict, model, path: Path) -> None:
    current = predictor_fingerprint(model)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "model_type"):
        if saved.get(key) != current.get(key):
            raise PredictorFileError(
                f"predictor {path} was fitted for model {saved.get('name')!r} "
                f"({key}={saved.get(key)!r}), but this model has {key}={current.get(key)!r}; "
                "train one for this model with `entcal train --model NAME --out DIR`"
            )
    a, b = saved.get("lm_head_digest"), current["lm_head_digest"]
    if a is not None and not all(
        math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a, b)
    ):
        raise PredictorFileError(
            f"predictor {path} was fitted for model {saved.get('name')!r}, whose weights differ "
            f"from this model's (LM-head digest {a} vs {b}); train one for this model"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def _demean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    _, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=values)
    counts = np.bincount(inv)
    return values - (sums / counts)[inv]


def _quiet_fit(est, X, y):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _ridge_slope(w: Tensor, ent: Tensor, var: Tensor, lpos: Tensor) -> Tensor:
    """Per-row coefficient ``A`` of ``lp`` in the ridge model's Ĥ (see ``_ridge_full``)."""
    return w[0] + w[5] * ent + w[6] * var + w[7] * lpos


class FutureEntropyPredictor:
    """Predicts the k-step future entropy after choosing each candidate token.

    Args:
        estimator: ``"auto"`` (pick by held-out R²: the MLP only if it beats ridge by more than
            0.02, as it costs more at sampling time), ``"ridge"`` or ``"mlp"``.
        ridge_alpha: L2 strength of the ridge model.
        hidden: width of the MLP's hidden layer.
        heldout_fraction: share of prefix groups held out to score the estimators.
        random_state: seed of the split and the MLP.

    Attributes (after ``fit`` or ``load``): ``kind_``, ``x_mean_``, ``x_scale_``, ``y_mean_``,
    ``y_scale_``, ``weights_`` (torch tensors), ``table_`` (the ``(V, d)`` token table, set by the
    caller before ``save``), ``scores_`` (held-out R² of each estimator, total and within-prefix),
    ``meta_`` (JSON-able training information: horizon, α, report).
    """

    def __init__(
        self,
        estimator: str = "auto",
        ridge_alpha: float = 1.0,
        hidden: int = 32,
        heldout_fraction: float = 0.2,
        random_state: int = 0,
    ) -> None:
        if estimator not in ("auto", "ridge", "mlp"):
            raise ValueError(f"estimator must be 'auto', 'ridge' or 'mlp', got {estimator!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
        self.estimator = estimator
        self.ridge_alpha = ridge_alpha
        self.hidden = hidden
        self.heldout_fraction = heldout_fraction
        self.random_state = random_state
        self.table_: Tensor | None = None
        self.meta_: dict[str, Any] = {}

    # ------------------------------------------------------------------ scikit-learn side

    def _make(self, kind: str, n: int = 10_000):
        if kind == "ridge":
            from sklearn.linear_model import Ridge

            return Ridge(alpha=self.ridge_alpha)
        from sklearn.neural_network import MLPRegressor

        return MLPRegressor(
            hidden_layer_sizes=(self.hidden,),
            activation="relu",
            alpha=1e-3,
            learning_rate_init=3e-3,
            max_iter=400,
            early_stopping=n >= 500,  # its 10% validation split needs enough rows
            n_iter_no_change=20,
            random_state=self.random_state,
        )

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None):
        """Fit on features ``X (n, F)`` and labels ``y (n,)``; ``groups`` are prefix ids."""
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
            scores[kind] = {
                "r2_heldout": _r2(y[te], pred),
                # What shapes p_α: differences between candidates of the same prefix.
                "r2_within_prefix_heldout": _r2(
                    _demean(y[te], groups[te]), _demean(pred, groups[te])
                ),
            }
        chosen = kinds[0]
        if len(kinds) == 2 and scores["mlp"]["r2_heldout"] > scores["ridge"]["r2_heldout"] + 0.02:
            # The MLP must earn its cost: ridge evaluates over the whole vocabulary in a few
            # elementwise passes, the MLP builds features for every candidate.
            chosen = "mlp"
        scores["chosen"] = chosen
        scores["r2_heldout"] = scores[chosen]["r2_heldout"]
        scores["r2_within_prefix_heldout"] = scores[chosen]["r2_within_prefix_heldout"]
        est = _quiet_fit(self._make(chosen, len(ys)), Xs, ys)
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
        """Predicted future entropy (nats) for feature rows ``X (n, F)`` (via the torch path)."""
        out = self.predict_features(torch.as_tensor(np.asarray(X), dtype=torch.float32))
        return out.double().numpy()

    # ------------------------------------------------------------------ torch side

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        cache = getattr(self, "_device_cache", None)
        if cache is None or cache[0] != device:
            t = {k: v.to(device) for k, v in self.weights_.items()}
            t["x_mean"] = torch.as_tensor(self.x_mean_, dtype=torch.float32, device=device)
            t["x_scale"] = torch.as_tensor(self.x_scale_, dtype=torch.float32, device=device)
            if self.table_ is not None:
                t["table"] = self.table_.to(device=device, dtype=torch.float32)
            self._device_cache = (device, t)
        return self._device_cache[1]

    def predict_features(self, feats: Tensor) -> Tensor:
        """Ĥ for features ``(..., F)`` as a torch op (same numbers as the sklearn estimator)."""
        t = self._tensors(feats.device)
        xs = (feats.float() - t["x_mean"]) / t["x_scale"]
        if self.kind_ == "ridge":
            out = xs @ t["coef"] + t["intercept"]
        else:
            out = torch.relu(xs @ t["w0"] + t["b0"]) @ t["w1"] + t["b1"]
        return out * self.y_scale_ + self.y_mean_

    def candidate_entropy(
        self, logprobs: Tensor, position: Tensor, mass: float = COVER_MASS
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Candidates covering ``mass`` of each row and their predicted Ĥ: ``(ids, valid, Ĥ)``."""
        self._check_vocab(logprobs)
        t = self._tensors(logprobs.device)
        ids, valid = cover_candidates(logprobs, mass)
        stats = entropy_stats(logprobs)
        if self.kind_ == "ridge":
            h = self._ridge_full(logprobs, position, stats, t).gather(-1, ids)
            return ids, valid, h
        feats = candidate_features(logprobs, ids, position, t["table"], stats)
        return ids, valid, self.predict_features(feats)

    def _check_vocab(self, logprobs: Tensor) -> None:
        if self.table_ is None:
            raise ValueError("the predictor has no token table; set table_ before use")
        if logprobs.shape[-1] != self.table_.shape[0]:
            raise ValueError(
                f"logits have {logprobs.shape[-1]} columns but the predictor was fitted for a "
                f"vocabulary of {self.table_.shape[0]} tokens (model "
                f"{self.meta_.get('fingerprint', {}).get('name')!r})"
            )

    def _ridge_full(
        self, logprobs: Tensor, position: Tensor, stats: tuple[Tensor, Tensor], t: dict
    ) -> Tensor:
        """Ĥ of every token of every row for the ridge model, without building features.

        The linear model over :func:`~entcal.calibrators.features.candidate_features` regroups as
        ``Ĥ(v) = R + A·lp + b·lp² + u[v] + lp·u2[v]`` with row terms ``R``, ``A`` and per-token
        vectors ``u = table·w_e``, ``u2 = table·w_{lp·e}``: a few elementwise passes over
        ``(N, V)``, whatever the number of candidates (flat rows need tens of thousands).
        """
        self._ridge_prepare(t)
        w = t["ridge_w"]
        ent, var = stats
        lpos = torch.log1p(position.to(logprobs.dtype))
        lp = logprobs.clamp_min(-80.0)  # as in the features
        row = t["ridge_c0"] + w[2] * ent + w[3] * var + w[4] * lpos + w[8] * ent * lpos
        slope = _ridge_slope(w, ent, var, lpos)
        return row[:, None] + lp * (slope[:, None] + t["ridge_u2"] + w[1] * lp) + t["ridge_u"]

    def _ridge_prepare(self, t: dict) -> None:
        """Cache the ridge model's weights in the original feature units, and ``u``, ``u2``."""
        if "ridge_w" not in t:
            w = t["coef"] / t["x_scale"] * self.y_scale_
            t["ridge_w"] = w
            t["ridge_c0"] = (t["intercept"][0] - (t["coef"] * t["x_mean"] / t["x_scale"]).sum()) * (
                self.y_scale_
            ) + self.y_mean_
            d = t["table"].shape[1]
            t["ridge_u"] = t["table"] @ w[9 : 9 + d]
            t["ridge_u2"] = t["table"] @ w[9 + d : 9 + 2 * d]

    def phi(self, logprobs: Tensor, position: Tensor, mass: float = COVER_MASS) -> Tensor:
        """φ(v) = log p(v) − Ĥ(v) over the whole vocabulary (non-candidates: mean Ĥ).

        The ridge model gives Ĥ of every token in closed form, so its candidates are taken from
        :func:`~entcal.calibrators.ops.cover_mask` (a superset of the minimal cover, found with a
        histogram, no sort) instead of a ``topk`` ladder, and φ is filled with elementwise
        passes.
        """
        if self.kind_ == "ridge":
            self._check_vocab(logprobs)
            t = self._tensors(logprobs.device)
            h = self._ridge_full(logprobs, position, entropy_stats(logprobs), t)
            return fill_phi_dense(
                logprobs, cover_mask(logprobs, mass) & (logprobs > float("-inf")), h
            )
        ids, valid, h = self.candidate_entropy(logprobs, position, mass)
        return fill_phi(logprobs, ids, valid, h)

    def adjusted(
        self, logprobs: Tensor, position: Tensor, alpha: Tensor | float, mass: float = COVER_MASS
    ) -> Tensor:
        """``log p_α`` of rows ``logprobs (N, V)`` (normalized): the calibrated distribution.

        Equals ``adjusted_logprobs(logprobs, self.phi(logprobs, position, mass), alpha)``. For
        the ridge model it is computed in a dozen elementwise passes, most in place: with
        ``Ĥ(v) = R + g(v)``, ``g = lp·(S + u2[v] + b·lp) + u[v]``, the row term ``R`` cancels in
        the softmax, so ``log p_α = log_softmax((1 + α)·lp − α·g)`` with non-candidates' ``g``
        replaced by the candidates' mass-weighted mean.
        """
        if self.kind_ != "ridge":
            return adjusted_logprobs(logprobs, self.phi(logprobs, position, mass), alpha)
        self._check_vocab(logprobs)
        t = self._tensors(logprobs.device)
        self._ridge_prepare(t)
        w = t["ridge_w"]
        n = logprobs.shape[0]
        a = torch.as_tensor(alpha, dtype=logprobs.dtype, device=logprobs.device).expand(n)
        check_alpha(a)
        a = a.reshape(n, 1)
        p = logprobs.exp()
        lpc = logprobs.clamp_min(-80.0)  # as in the features
        plp = p * lpc  # tokens with p = 0 contribute 0 (lpc is finite)
        ent = -plp.sum(-1)
        var = (torch.linalg.vecdot(plp, lpc) - ent * ent).clamp_min(0.0)
        del plp
        slope = _ridge_slope(w, ent, var, torch.log1p(position.to(logprobs.dtype)))
        g = lpc.mul(w[1]).add_(t["ridge_u2"]).add_(slope[:, None]).mul_(lpc).add_(t["ridge_u"])
        keep = cover_mask(logprobs, mass, probs=p)
        pk = torch.where(keep, p, 0.0)
        mean = torch.linalg.vecdot(pk, g) / pk.sum(-1).clamp_min(1e-30)
        del pk
        torch.where(keep, g, mean[:, None], out=g)
        # (1 + α)·lp − α·g; -inf tokens stay -inf
        g.mul_(-a).addcmul_(logprobs, 1.0 + a)
        return torch.log_softmax(g, dim=-1)

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path, fingerprint: dict | None = None) -> Path:
        """Write ``path/predictor.safetensors`` and ``path/predictor.json``; returns the folder."""
        from safetensors.torch import save_file

        if self.table_ is None:
            raise ValueError("set table_ (the token table) before saving")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"weights.{k}": v.contiguous() for k, v in self.weights_.items()}
        tensors["table"] = self.table_.to(torch.float16).contiguous()
        tensors["x_mean"] = torch.as_tensor(self.x_mean_, dtype=torch.float32)
        tensors["x_scale"] = torch.as_tensor(self.x_scale_, dtype=torch.float32)
        save_file(tensors, str(folder / _TENSORS), metadata={"format": "entcal-predictor"})
        (folder / _TENSORS).chmod(0o644)  # safetensors writes 0600; package data must be readable
        meta = dict(self.meta_)
        if fingerprint is not None:
            meta["fingerprint"] = fingerprint
        meta.update(
            {
                "format_version": FORMAT_VERSION,
                "kind": self.kind_,
                "feature_names": feature_names(int(self.table_.shape[1])),
                "y_mean": self.y_mean_,
                "y_scale": self.y_scale_,
                "scores": self.scores_,
                "sha256": _sha256(folder / _TENSORS),
            }
        )
        self.meta_ = meta
        (folder / _META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
        return folder

    @classmethod
    def load(
        cls, path: str | Path, model=None, fingerprint: dict | None = None
    ) -> FutureEntropyPredictor:
        """Load a saved predictor (folder, or the path of its ``predictor.json``).

        With ``model`` (or a ``fingerprint`` dict), the model it was fitted for must match.
        Raises ``FileNotFoundError`` for a missing file and :class:`PredictorFileError` for a
        malformed, truncated or corrupted one or a model mismatch. Never unpickles.
        """
        from safetensors import safe_open

        folder = Path(path).expanduser()
        if folder.name == _META or folder.name == _TENSORS:
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
            raise PredictorFileError(
                f"predictor file {meta_path} is not an entcal predictor of format version "
                f"{FORMAT_VERSION}"
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
            self.table_ = tensors["table"].float()
            self.x_mean_ = tensors["x_mean"].numpy().astype(np.float64)
            self.x_scale_ = tensors["x_scale"].numpy().astype(np.float64)
            self.weights_ = {
                k.split(".", 1)[1]: v.float()
                for k, v in tensors.items()
                if k.startswith("weights.")
            }
            self.y_mean_ = float(meta["y_mean"])
            self.y_scale_ = float(meta["y_scale"])
        except KeyError as exc:
            raise PredictorFileError(f"predictor {folder} lacks {exc}") from None
        n_feat = len(feature_names(int(self.table_.shape[1])))
        expected = {"ridge": {"coef": (n_feat,)}, "mlp": {"w0": (n_feat, -1)}}.get(self.kind_)
        if expected is None:
            raise PredictorFileError(f"predictor {folder} has unknown kind {self.kind_!r}")
        for name, shape in expected.items():
            got = tuple(self.weights_.get(name, torch.empty(0)).shape)
            if len(got) != len(shape) or any(s not in (-1, g) for s, g in zip(shape, got)):
                raise PredictorFileError(f"predictor {folder}: weights.{name} has shape {got}")
        if self.x_mean_.shape != (n_feat,):
            raise PredictorFileError(f"predictor {folder}: x_mean has shape {self.x_mean_.shape}")
        self.scores_ = meta.get("scores", {})
        self.meta_ = meta
        saved_fp = meta.get("fingerprint") or {}
        if saved_fp.get("vocab_size") not in (None, int(self.table_.shape[0])):
            raise PredictorFileError(f"predictor {folder}: token table does not match vocab size")
        if model is not None:
            _check_fingerprint(saved_fp, model, folder)
        elif fingerprint is not None:
            for key in ("vocab_size", "hidden_size", "model_type"):
                if fingerprint.get(key) is not None and saved_fp.get(key) != fingerprint.get(key):
                    raise PredictorFileError(
                        f"predictor {folder} was fitted for {saved_fp.get('name')!r} "
                        f"({key}={saved_fp.get(key)!r}), not for {fingerprint.get('name')!r} "
                        f"({key}={fingerprint.get(key)!r})"
                    )
        return self

    def check_model(self, model) -> None:
        """Raise :class:`PredictorFileError` unless ``model`` is the one this was fitted for."""
        _check_fingerprint(self.meta_.get("fingerprint") or {}, model, Path("<in memory>"))

    # ------------------------------------------------------------------ α stored with it

    def alpha_for(self, position: Tensor) -> Tensor:
        """The fitted α for each row's position (per bucket if fitted so, else the single α)."""
        info = self.meta_.get("alpha") or {}
        edges = info.get("bucket_edges")
        values = info.get("bucket_values")
        if edges and values:
            idx = torch.bucketize(position, torch.tensor(edges, device=position.device), right=True)
            return torch.tensor(values, dtype=torch.float32, device=position.device)[idx]
        return torch.full(position.shape, float(info.get("global", 0.0)), device=position.device)
