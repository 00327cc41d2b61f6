"""``entcal compare --engine vllm``: the same schema and sanity as the transformers engine, and
agreement with it on the same prompts, seeds and decoders.

Human log loss does not depend on the engine, so it must agree exactly for every decoder; the
generations differ (each engine has its own random streams), so ancestral EntCE must agree within
2 standard errors of the difference of two independent estimates.
"""

from __future__ import annotations

import math

import pytest
from conftest import run_quick_compare
from test_compare import check_quick_results

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def quick_vllm(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-vllm") / "quick"
    results, table = run_quick_compare(out, "--engine", "vllm")
    return out, results, table


def test_vllm_engine_passes_the_quick_schema_and_sanity(quick_vllm):
    out, res, table = quick_vllm
    check_quick_results(out, res, table)
    for spec, d in res["decoders"].items():
        # vLLM's raw log-prob of each sampled token and the scorer's agree: one model.
        assert d["check"]["max_abs_raw_logprob_diff_generate_vs_score"] < 1e-2, spec
        # every sampled token lies in its decoder's support: vLLM applied each request's spec
        assert d["check"]["tokens_outside_decoder"] == 0.0, spec
        # the sampled distribution's statistics were recomputed (not left empty or raw)
        assert all(math.isfinite(x) for x in d["gen_entropy_per_step"]), spec


def test_engines_agree(quick_vllm, quick_compare):
    _, v, _ = quick_vllm
    _, t, _ = quick_compare
    assert v["human"]["log_loss"] == t["human"]["log_loss"]
    assert set(v["decoders"]) == set(t["decoders"]) - {"anchored"}
    for spec in v["decoders"]:
        assert v["decoders"][spec]["human_log_loss"] == t["decoders"][spec]["human_log_loss"], spec
    a, b = v["decoders"]["ancestral"], t["decoders"]["ancestral"]
    se = math.hypot(a["entce_se"], b["entce_se"])
    assert abs(a["entce"] - b["entce"]) <= 2 * se, (a["entce"], b["entce"], se)
    # the token streams are the engines' own: not the same text
    assert a["sample"] != b["sample"]
    # ancestral sampling under temperature 0.9 is cooler than under 1, in either engine
    for res in (v, t):
        d = res["decoders"]
        assert d["temperature=0.9"]["gen_entropy"] < d["ancestral"]["gen_entropy"]
