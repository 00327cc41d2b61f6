"""Settings of ``entcal train`` (kept free of torch so the CLI registers instantly)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["ENGINES", "TrainConfig"]

#: What can generate the training rollouts (the first is the default).
ENGINES = ("transformers", "vllm")


@dataclasses.dataclass
class TrainConfig:
    """Settings of a training run (:func:`entcal.calibrators.train.train_predictor`).

    Documents come from the corpus's training split; the first ``fit_docs`` train the predictor
    (their human continuations teacher forced, and one ancestral generation of
    ``length + horizon`` tokens from each prompt), the next ``gate_docs`` fit the gate (the
    decoder's own generations and the human log loss of the same prompts). The defaults are the
    shipped SmolLM2-135M predictor's settings (about 25 minutes on 2 CPU cores), before its base
    was searched with ``gate_of``.
    """

    model: str = "smollm2-135m"
    corpus: str | None = None
    seed: int = 0
    fit_docs: int = 96
    gate_docs: int = 48
    prompt_tokens: int = 128
    length: int = 256
    #: steps ahead over which the future entropy rate (the label) is averaged
    horizon: int = 64
    projection_dim: int = 32
    estimator: str = "ridge"
    #: thresholds tried, as quantiles of the predicted excess over the gate documents' human text
    threshold_quantiles: tuple[float, ...] = (0.96, 0.98)
    #: constant parts α_0 of α tried under each threshold (0.01 ≈ temperature 0.99)
    base_alphas: tuple[float, ...] = (0.0,)
    #: position buckets with a strength each (generated-token index edges)
    bucket_edges: tuple[int, ...] = (64, 128, 192)
    #: rounds (at most) of the per-bucket strength update per threshold and base, from this
    #: strength
    gate_rounds: int = 5
    gate_start: float = 2.0
    #: a gate calibrates when |EntCE| of each position bucket is at most this (nats/token)
    entce_tolerance: float = 0.1
    batch_size: int = 32
    #: what generates the rollouts: "transformers" or "vllm" (``vllm.LLM``, token ids only; the
    #: statistics come from the same teacher-forced pass either way). The gate's generations use
    #: transformers: its decoders hold an in-memory predictor that a vLLM request cannot name.
    engine: str = "transformers"
    #: further ``vllm.LLM`` arguments for ``engine="vllm"`` (``dtype``, ``tensor_parallel_size``)
    vllm_args: dict = dataclasses.field(default_factory=dict)
    #: a predictor folder whose gate alone is refitted (its predictor, threshold and buckets are
    #: kept, the strengths start from its own): the base search without new rollouts
    gate_of: str | None = None
    #: generated steps at the start whose gate stays closed (their state has too little history
    #: to be read; the base alone acts there); None: 0, or with ``gate_of`` the predictor's own
    warmup: int | None = None
    #: lift λ in [0, 1]: the share of a text's shortfall below the human reference level ℓ
    #: added to its predicted excess (its early level: the mean predicted excess over the
    #: REFERENCE_WINDOW steps after the warm-up); None: 0, or with ``gate_of`` the predictor's own
    lift: float | None = None
    #: ℓ is this quantile of the early levels of the gate documents' human texts (low, so that
    #: few texts of the training domain are lifted); None: 0.25, or with ``gate_of`` the
    #: predictor's run's own
    lift_quantile: float | None = None

    def validate(self) -> None:
        for name in ("fit_docs", "gate_docs", "prompt_tokens", "length", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("projection_dim", "gate_rounds", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup is not None and (
            isinstance(self.warmup, bool)
            or not isinstance(self.warmup, int)
            or not 0 <= self.warmup < self.length
        ):
            raise ValueError(
                f"warmup must be an integer in [0, length={self.length}), got {self.warmup!r}"
            )
        if self.lift is not None and (
            isinstance(self.lift, bool)
            or not isinstance(self.lift, (int, float))
            or not 0.0 <= self.lift <= 1.0
        ):
            raise ValueError(f"lift must be a number in [0, 1], got {self.lift!r}")
        if self.lift_quantile is not None and (
            isinstance(self.lift_quantile, bool)
            or not isinstance(self.lift_quantile, (int, float))
            or not 0.0 <= self.lift_quantile <= 1.0
        ):
            raise ValueError(
                f"lift_quantile must be a number in [0, 1], got {self.lift_quantile!r}"
            )
        if self.estimator not in ("auto", "ridge", "mlp"):
            raise ValueError(f"estimator must be auto, ridge or mlp, got {self.estimator!r}")
        if not self.threshold_quantiles or not all(0 < q < 1 for q in self.threshold_quantiles):
            raise ValueError(
                f"threshold_quantiles must be numbers in (0, 1), got {self.threshold_quantiles}"
            )
        if not self.base_alphas or not all(0 <= a <= 1 for a in self.base_alphas):
            raise ValueError(f"base_alphas must be numbers in [0, 1], got {self.base_alphas}")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or any(
            not 1 <= e < self.length for e in self.bucket_edges
        ):
            raise ValueError(
                f"bucket_edges must be increasing, >= 1 and below length={self.length} (every "
                f"bucket needs generated steps to fit its strength), got {self.bucket_edges}"
            )
        if not 0 < self.gate_start <= 8:
            raise ValueError(f"gate_start must lie in (0, 8], got {self.gate_start}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.vllm_args and self.engine != "vllm":
            raise ValueError("vllm_args (--vllm-arg) need engine='vllm' (--engine vllm)")
        if self.gate_of is not None and not (Path(self.gate_of) / "predictor.json").is_file():
            raise ValueError(f"gate_of: no predictor.json in {self.gate_of}")
        if not self.entce_tolerance > 0:
            raise ValueError(f"entce_tolerance must be > 0, got {self.entce_tolerance}")
