"""entcal.synthetic: synthetic sources with known answers, run as real causal LMs.

* :mod:`entcal.synthetic.markov`: :class:`MarkovChain`, a first-order Markov source with
  analytic entropies, varentropies, log losses, future entropies and stationary law;
* :mod:`entcal.synthetic.markov_lm`: :class:`MarkovChainLM` / :class:`MarkovChainTokenizer`, the
  chain as a ``transformers`` model and tokenizer (``MarkovChain.as_model()``);
* :mod:`entcal.synthetic.galton_watson`: :class:`BranchingSourceLM`, a Galton–Watson process as a
  causal LM with the branching factor R set exactly (known answer of the list-decoding study).

The names above are importable from ``entcal.synthetic`` directly. This package imports only
torch, transformers and :mod:`entcal.corpora`.
"""

from __future__ import annotations

from entcal.synthetic.galton_watson import BranchingSourceLM, synthetic_pairs
from entcal.synthetic.markov import MarkovChain
from entcal.synthetic.markov_lm import (
    MarkovChainConfig,
    MarkovChainLM,
    MarkovChainModel,
    MarkovChainTokenizer,
)

__all__ = [
    "BranchingSourceLM",
    "MarkovChain",
    "MarkovChainConfig",
    "MarkovChainLM",
    "MarkovChainModel",
    "MarkovChainTokenizer",
    "synthetic_pairs",
]
