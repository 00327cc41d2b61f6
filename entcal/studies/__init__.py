"""entcal.studies: structural studies of a model, which ask what it is rather than how to sample it.

* :mod:`entcal.studies.list_rules` / :mod:`entcal.studies.list_decoder`: threshold list decoding
  (Chang, arXiv 2303.13112): the keep rules, and the batched decoder that owns its forward passes;
* :mod:`entcal.studies.branching` (with ``branching_stats``, ``branching_report``): β, R and the
  R = 1 transition of list decoding, measured against human continuations;
* :mod:`entcal.studies.mine`, ``capture``, ``emergence``, ``emergence_report``: information
  emergence per block (Chen et al., arXiv 2405.12617), MI by a MINE critic.

A study may import :mod:`entcal.models`, :mod:`entcal.corpora`, :mod:`entcal.synthetic`,
:mod:`entcal.decoding` and :mod:`entcal.eval`; nothing imports it except ``entcal.commands``.
Submodules are imported on use; nothing heavy is imported here.
"""

from __future__ import annotations

__all__ = [
    "branching",
    "branching_report",
    "branching_stats",
    "capture",
    "emergence",
    "emergence_report",
    "list_decoder",
    "list_rules",
    "mine",
]
