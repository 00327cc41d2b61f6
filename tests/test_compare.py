"""``entcal compare``: bad input, the generation cache / resume, and a real --quick run."""

from __future__ import annotations

import json
import math

import pytest

from entcal.cli import main
from entcal.eval.compare import CompareConfig, parse_decoders, run_compare
from entcal.synthetic import MarkovChain


def test_unknown_decoder_fails_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["compare", "--decoders", "ancestral; top_p=0.9; frobnicate=2", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "frobnicate" in err
    assert not out.exists()  # nothing generated, not even the folder
    with pytest.raises(ValueError, match="top_p"):
        parse_decoders("top_p=7")
    with pytest.raises(ValueError, match="no decoder"):
        parse_decoders(" ; ")


def test_bad_sizes_and_corpus(tmp_path, capsys):
    rc = main(["compare", "--n", "0", "--out", str(tmp_path / "a")])
    assert rc == 2 and "n must be an integer >= 1" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc = main(["compare", "--human", str(empty), "--out", str(tmp_path / "b")])
    assert rc == 2 and "holds no text" in capsys.readouterr().err
    rc = main(["compare", "--length", "9000", "--out", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "exceeds the context" in err and "8192" in err
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n\nAnd a second short paragraph.\n")
    rc = main(["compare", "--human", str(short), "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 2 and "no document has" in capsys.readouterr().err


def test_cache_makes_a_rerun_resume(tmp_path):
    chain = MarkovChain.random(8, seed=1)
    model, tok = chain.as_model()
    prompts = chain.sample(40, 4, seed=0)
    human = chain.sample(40, 16, start=prompts[:, -1], seed=1)
    pairs = (prompts.tolist(), human.tolist())

    def run(decoders):
        cfg = CompareConfig(
            out=tmp_path, model="markov-8", decoders=decoders, n=40, length=16, prompt_tokens=4,
            batch_size=16, progress=False, plots=False,
        )  # fmt: skip
        return run_compare(cfg, model=model, tokenizer=tok, pairs=pairs)

    first = run("ancestral; top_p=0.9")
    gen_files = sorted((tmp_path / "cache").glob("gen-*.pt"))
    assert len(gen_files) == 2 * 3  # two decoders x three prompt batches
    stamps = {p: p.stat().st_mtime_ns for p in gen_files}
    # An interrupted run: one batch of one decoder is missing; the rest is reused as it is.
    gen_files[0].unlink()
    gen_files[1].write_bytes(b"cut short")
    second = run("ancestral; top_p=0.9")
    for p in gen_files[2:]:
        assert p.stat().st_mtime_ns == stamps[p]
    assert gen_files[0].exists()
    first.pop("timing"), second.pop("timing")
    assert first == second  # same seeds: the recomputed batches are identical
    # One more decoder: only its generations and scores are new.
    score_files = sorted((tmp_path / "cache").glob("score-*.pt"))
    assert len(score_files) == (1 + 2) * 3  # human + two decoders, three prompt batches
    stamps = {p: p.stat().st_mtime_ns for p in score_files}
    third = run("ancestral; top_p=0.9; temperature=0.5")
    assert len(list((tmp_path / "cache").glob("gen-*.pt"))) == 3 * 3
    assert len(list((tmp_path / "cache").glob("score-*.pt"))) == (1 + 3) * 3
    assert all(p.stat().st_mtime_ns == stamps[p] for p in score_files)
    for spec in ("ancestral", "top_p=0.9"):
        assert third["decoders"][spec] == first["decoders"][spec]


def test_samples_per_prompt_stay_with_their_prompt(tmp_path):
    """--samples k: generation i·k + j continues prompt i. On a Markov chain the next-token law
    depends on the last prompt token, so a sample scored after the wrong prompt would disagree
    with what generate recorded; EntCE's error clusters the k samples of a prompt."""
    chain = MarkovChain.random(8, seed=3)
    model, tok = chain.as_model()
    prompts = chain.sample(10, 4, seed=0)
    human = chain.sample(10, 12, start=prompts[:, -1], seed=1)
    cfg = CompareConfig(
        out=tmp_path, model="markov-8", decoders="ancestral; temperature=0.7", n=10, length=12,
        prompt_tokens=4, samples=3, batch_size=4, progress=False, plots=False,
    )  # fmt: skip
    res = run_compare(cfg, model=model, tokenizer=tok, pairs=(prompts.tolist(), human.tolist()))
    assert res["samples"] == 3
    for spec, d in res["decoders"].items():
        assert d["check"]["max_abs_raw_logprob_diff_generate_vs_score"] < 1e-4, spec
        assert math.isfinite(d["entce_se"]) and d["entce_se"] > 0
    with pytest.raises(ValueError, match="samples"):
        CompareConfig(out=tmp_path, samples=0).validate()


def test_frontier_points_and_plot_on_markov_source(tmp_path):
    import json

    from entcal.eval.frontier import run_frontier

    chain = MarkovChain.random(8, seed=1)
    model, tok = chain.as_model()
    prompts = chain.sample(24, 4, seed=0)
    human = chain.sample(24, 16, start=prompts[:, -1], seed=1)
    cfg = CompareConfig(
        out=tmp_path, model="markov-8", n=24, length=16, prompt_tokens=4, batch_size=24,
        progress=False,
    )  # fmt: skip
    sweep = {"temperature": (0.8, 0.9), "top_p": (0.9,)}
    with pytest.raises(ValueError, match="top_p"):
        run_frontier(cfg, {"top_p": (1.5,)}, model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="unknown family"):
        run_frontier(cfg, {"beam": (4,)}, model=model, tokenizer=tok)
    pairs = (prompts.tolist(), human.tolist())
    doc = run_frontier(cfg, sweep, model=model, tokenizer=tok, pairs=pairs)
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert (tmp_path / "frontier.png").stat().st_size > 0
    table = (tmp_path / "frontier.md").read_text()
    assert "| temperature | `temperature=0.8` |" in table and "∞" in table
    assert [p["spec"] for p in saved["points"]] == [
        "ancestral", "temperature=0.8", "temperature=0.9", "top_p=0.9",
    ]  # fmt: skip
    pts = {p["spec"]: p for p in doc["points"]}
    assert pts["ancestral"]["log_loss_cost"] == pytest.approx(0.0, abs=1e-9)
    # a lower temperature: lower entropy, higher human log loss (analytic direction)
    assert (
        pts["temperature=0.8"]["entce"]
        < pts["temperature=0.9"]["entce"]
        < pts["ancestral"]["entce"]
    )
    assert pts["temperature=0.8"]["log_loss_cost"] > pts["temperature=0.9"]["log_loss_cost"] > 0
    assert saved["points"][-1]["log_loss_cost"] == "inf"  # truncation: infinite cost
    for p in doc["points"]:
        for key in ("family", "spec", "entce", "entce_se", "human_log_loss", "log_loss_cost",
                    "entropy_slope"):  # fmt: skip
            assert key in p


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


QUICK_SPECS = [
    "ancestral",
    "temperature=0.9",
    "top_p=0.95",
    "min_p=0.05",
    "typical=0.9",
    "eta=0.0009",
    "calibrated",
    "anchored",
]


def check_quick_results(out, res: dict, table: str) -> None:
    """The schema and sanity of ``entcal compare --quick`` on SmolLM2, whichever engine ran."""
    assert "| `ancestral` |" in table
    for key in ("model", "corpus", "n", "length"):
        assert key in res
    assert res["model"] == "smollm2-135m" and res["corpus"] == "pydoc"
    assert res["n"] == 8 and res["length"] == 48
    assert _finite(res["human"]["log_loss"])
    # the vLLM and Ray engines leave out the default that reads the prompt through the model
    expected = QUICK_SPECS if res["engine"] == "transformers" else QUICK_SPECS[:-1]
    assert list(res["decoders"]) == expected
    for spec, d in res["decoders"].items():
        for key in ("gen_entropy", "entropy_slope", "human_tokens_excluded"):
            assert _finite(d[key]), (spec, key)
        assert len(d["gen_entropy_per_step"]) == 48
        assert d["human_log_loss"] == "inf" or _finite(d["human_log_loss"])
        assert d["entce"] == "-inf" or _finite(d["entce"])
        for key in ("mean_abs_gap", "z_ks_pvalue", "typical_fraction"):
            assert _finite(d["aep"][key]), (spec, key)
        for det in ("log_likelihood", "log_rank", "entropy", "typicality"):
            assert 0.0 <= d["detect"][det]["auroc"] <= 1.0
            assert 0.0 <= d["detect"][det]["tpr_at_1fpr"] <= 1.0
        for key in ("distinct_2", "self_bleu", "zipf", "repetition"):
            assert _finite(d["diversity"][key]), (spec, key)
    anc = res["decoders"]["ancestral"]
    assert anc["human_log_loss"] == pytest.approx(res["human"]["log_loss"], abs=1e-5)
    assert anc["human_tokens_excluded"] == 0.0
    # temperature < 1 never excludes a token and raises the human log loss.
    assert res["decoders"]["temperature=0.9"]["human_tokens_excluded"] == 0.0
    assert res["decoders"]["temperature=0.9"]["human_log_loss"] > anc["human_log_loss"]
    for spec in ("top_p=0.95", "min_p=0.05", "typical=0.9", "eta=0.0009"):
        d = res["decoders"][spec]
        assert d["human_tokens_excluded"] > 0, spec
        assert d["human_log_loss"] == "inf" and d["entce"] == "-inf"
        assert _finite(d["human_log_loss_included"]) and _finite(d["log_loss_gap"])
    for name in ("report.md", "entropy_per_step.png", "aep.png", "roc.png",
                 "calibration_vs_logloss.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_compare_quick_on_smollm2(quick_compare):
    out, res, table = quick_compare
    check_quick_results(out, res, table)
    for spec, d in res["decoders"].items():
        # generate's raw log-probs and the batched scorer's agree.
        assert d["check"]["max_abs_raw_logprob_diff_generate_vs_score"] < 1e-2, spec


def test_observer_adds_binoculars(tmp_path):
    chain, observer_chain = MarkovChain.random(8, seed=1), MarkovChain.random(8, seed=2)
    model, tok = chain.as_model()
    observer, _ = observer_chain.as_model()
    prompts = chain.sample(24, 4, seed=0)
    human = observer_chain.sample(24, 16, start=prompts[:, -1], seed=1)
    cfg = CompareConfig(
        out=tmp_path, model="markov-8", decoders="ancestral", n=24, length=16, prompt_tokens=4,
        progress=False, plots=False,
    )  # fmt: skip
    res = run_compare(
        cfg, model=model, tokenizer=tok, pairs=(prompts.tolist(), human.tolist()), observer=observer
    )
    det = res["decoders"]["ancestral"]["detect"]["binoculars"]
    assert 0.0 <= det["auroc"] <= 1.0 and det["generated_mean"] < 0
    bad, _ = MarkovChain.random(5, seed=0).as_model()
    with pytest.raises(ValueError, match="same tokenizer"):
        run_compare(
            cfg, model=model, tokenizer=tok, pairs=(prompts.tolist(), human.tolist()), observer=bad
        )


@pytest.mark.slow
def test_compare_killed_at_any_point_resumes_to_the_same_results(
    tmp_path, smollm2_tokenizer, tiny_llama
):
    """SIGKILL an `entcal compare` process several times at different points (some in the
    middle of writing a cache file); each rerun resumes, and the final results equal those of
    an uninterrupted run (cache files are written to a temporary name and renamed)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tok = smollm2_tokenizer
    folder = tmp_path / "tiny"
    model = tiny_llama(vocab=len(tok), layers=1, heads=2, kv_heads=1, max_positions=256)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    def command(out):
        return [
            sys.executable, "-m", "entcal.cli", "compare", "--model", str(folder), "--n", "12",
            "--length", "24", "--prompt-tokens", "16", "--batch-size", "2", "--no-progress",
            "--decoders", "ancestral; top_p=0.9; mirostat:tau=3", "--out", str(out),
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(command(whole), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    for n_files in (2, 9, 17):  # kill once a few, then more, cache files exist
        proc = subprocess.Popen(command(cut), env=env, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list((cut / "cache").glob("*.pt"))) < n_files:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cut / "results.json").exists() or proc.returncode == 0
    subprocess.run(command(cut), check=True, env=env, capture_output=True)
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    for r in (a, b):
        r.pop("timing", None)
        r.pop("out", None)
    assert a == b


def test_engine_argument_errors(tmp_path, capsys):
    """Bad engine arguments fail before anything loads (no vLLM needed to see it)."""
    rc = main(["compare", "--quick", "--engine", "vllm", "--vllm-arg", "no-equals",
               "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 2
    assert "--vllm-arg 'no-equals'" in capsys.readouterr().err
    rc = main(["compare", "--quick", "--engine", "vllm", "--decoders", "lookahead:alpha=0.2",
               "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "lookahead" in err and "--engine transformers" in err
    rc = main(["compare", "--quick", "--engine", "vllm", "--vllm-arg", "x={1, 2}",
               "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 2 and "must be a number, string" in capsys.readouterr().err


def test_default_decoders_by_predictor_and_engine():
    """A model with no shipped predictor runs no calibrated; vLLM and Ray leave out anchored
    (its target=prompt reads the prompt through the model)."""
    from entcal.commands.compare_cmd import default_decoders
    from entcal.eval.defaults import DEFAULT_DECODERS

    assert default_decoders(True, "transformers") == (DEFAULT_DECODERS, [])
    plain, notes = default_decoders(False, "transformers")
    specs = [d.strip() for d in plain.split(";")]
    assert "calibrated" not in specs and "anchored" in specs and len(notes) == 1
    for has_predictor in (True, False):
        served, notes = default_decoders(has_predictor, "vllm")
        assert not any(d.strip().startswith("anchored") for d in served.split(";"))
        assert "ancestral" in served and notes
