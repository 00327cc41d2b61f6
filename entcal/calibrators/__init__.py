"""entcal.calibrators: the future-entropy predictor, the calibrated decoder beside it, how both are
trained, and the simpler calibrators they are compared with.

* :mod:`~entcal.calibrators.state`: the generation's state as batched tensors (entropy running
  means, a projection of the final hidden state read back from the logits), one definition for
  sampling and training;
* :mod:`~entcal.calibrators.predictor` (estimator, scikit-learn's shape),
  :mod:`~entcal.calibrators.predictor_file` (safetensors + JSON, checksum, fingerprint; never
  unpickled), :mod:`~entcal.calibrators.derailment` (the sampling-time application as pure
  tensor functions);
* :mod:`~entcal.calibrators.calibrated`: the ``calibrated`` decoder;
* :mod:`~entcal.calibrators.strength`, :mod:`~entcal.calibrators.train`,
  :mod:`~entcal.calibrators.config`: the gate fit by calibration and ``entcal train``;
* :mod:`~entcal.calibrators.paper_formula`, :mod:`~entcal.calibrators.alpha`,
  :mod:`~entcal.calibrators.montecarlo`, :mod:`~entcal.calibrators.lookahead`,
  :mod:`~entcal.calibrators.temperature`: the paper's per-candidate formula and its α fit,
  Monte-Carlo future entropy, the one-step lookahead comparator, the EntCE = 0 temperature.

The package may import :mod:`entcal.models`, :mod:`entcal.corpora`, :mod:`entcal.decoding` and
:mod:`entcal.generation`; ``decoding`` finds the ``calibrated`` and ``lookahead`` methods through
the ``entcal.decoders`` entry points, never by importing this package.
"""
