"""Generations folders (the row schema of entcal.eval.ray_engine) and ``compare
--from-generations``: known answers on the synthetic Markov source, whose generations carry the
exact statistics ``entcal.generate`` recorded while sampling."""

import json

import pytest
import torch

from entcal import generate
from entcal.eval.compare import CompareConfig, run_compare
from entcal.eval.ray_engine import generation_rows, read_generations, specs_in, write_generations
from entcal.synthetic import MarkovChain

SPECS = ["ancestral", "top_p=0.8", "mirostat:tau=1.5"]


@pytest.fixture(scope="module")
def markov_run(tmp_path_factory):
    """Markov prompts and human text, and generations of SPECS (2 samples per prompt) written
    to a folder, with what generate recorded."""
    chain = MarkovChain.random(8, seed=5)
    model, tok = chain.as_model()
    prompts = chain.sample(6, 4, seed=0).tolist()
    human = chain.sample(6, 10, start=torch.tensor([p[-1] for p in prompts]), seed=1).tolist()
    recorded, generations = {}, {}
    for spec in SPECS:
        gens = generate(model, tok, prompts, spec, max_new_tokens=10, seed=3, n=2)
        recorded[spec] = gens
        generations[spec] = {
            "tokens": torch.tensor([g.token_ids for g in gens]),
            "raw_logprob": torch.stack([g.raw_logprob for g in gens]),
        }
    folder = tmp_path_factory.mktemp("gens")
    write_generations(folder, prompts, generations, samples=2)
    return model, tok, prompts, human, folder, recorded, generations


def test_a_folder_reads_back_as_written(markov_run):
    _, _, prompts, _, folder, _, generations = markov_run
    canonical = ["ancestral", "top_p=0.8", "mirostat:tau=1.5,eta=0.1"]
    assert specs_in(folder) == canonical
    back = read_generations(folder, prompts, samples=2, length=10)
    assert list(back) == canonical
    for spec, written in zip(canonical, SPECS, strict=True):
        assert torch.equal(back[spec]["tokens"], generations[written]["tokens"])
        assert torch.equal(back[spec]["raw_logprob"], generations[written]["raw_logprob"])
    # shards in any order and split across files read the same
    rows = [json.loads(x) for x in (folder / "generations.json").read_text().splitlines()]
    split = folder.parent / "split"
    for k in range(3):  # subfolders too: one per generating call
        (split / f"call-{k}").mkdir(parents=True)
        (split / f"call-{k}" / "shard.json").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[k::3][::-1])
        )
    again = read_generations(split, prompts, SPECS[::-1], samples=2, length=10)
    assert list(again) == canonical[::-1]
    assert all(torch.equal(again[s]["tokens"], back[s]["tokens"]) for s in canonical)


def test_compare_from_generations_recovers_what_generate_recorded(markov_run, tmp_path):
    """The scorer, replaying each decoder along its own tokens (mirostat's state included),
    gives the statistics generate recorded; the human log loss does not depend on where the
    generations came from."""
    model, tok, prompts, human, folder, recorded, _ = markov_run
    cfg = dict(
        model="markov-8", decoders=SPECS, n=6, length=10, prompt_tokens=4, samples=2,
        batch_size=4, progress=False, plots=False,
    )  # fmt: skip
    files = run_compare(
        CompareConfig(out=tmp_path / "f", from_generations=str(folder), **cfg),
        model=model, tokenizer=tok, pairs=(prompts, human),
    )  # fmt: skip
    own = run_compare(
        CompareConfig(out=tmp_path / "t", **cfg), model=model, tokenizer=tok, pairs=(prompts, human)
    )
    assert files["engine"] == "files" and own["engine"] == "transformers"
    assert list(files["decoders"]) == list(own["decoders"])
    for spec, (canonical, d) in zip(SPECS, files["decoders"].items(), strict=True):
        per_step = torch.stack([g.entropy for g in recorded[spec]]).mean(0)
        assert d["gen_entropy_per_step"] == pytest.approx(per_step.tolist(), abs=1e-4), spec
        assert d["check"]["max_abs_raw_logprob_diff_generate_vs_score"] < 1e-4
        assert d["check"]["tokens_outside_decoder"] == 0.0
        assert d["human_log_loss"] == own["decoders"][canonical]["human_log_loss"]


def test_bad_folders_are_named(markov_run, tmp_path):
    _, _, prompts, _, folder, _, _ = markov_run
    with pytest.raises(ValueError, match="no generations"):
        read_generations(tmp_path, prompts, samples=2, length=10)
    with pytest.raises(ValueError, match="lacks 12 of 12"):
        read_generations(folder, prompts, ["top_k=5"], samples=2, length=10)
    with pytest.raises(ValueError, match="length is 11"):
        read_generations(folder, prompts, samples=2, length=11)
    other = [[*p[:-1], (p[-1] + 1) % 8] for p in prompts]
    with pytest.raises(ValueError, match="other settings"):
        read_generations(folder, other, samples=2, length=10)
    with pytest.raises(ValueError, match="outside this run"):
        read_generations(folder, prompts, samples=1, length=10)
    rows = (folder / "generations.json").read_text().splitlines()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.json").write_text(rows[0] + "\n" + rows[0] + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        read_generations(bad, prompts, samples=2, length=10)
    (bad / "a.json").write_text('{"spec": "ancestral", "prompt": 0}\n')
    with pytest.raises(ValueError, match=r"a\.json line 1: not a generation row"):
        read_generations(bad, prompts, samples=2, length=10)
    (bad / "a.json").write_text(rows[0].replace('"ancestral"', '"top_p=7"') + "\n")
    with pytest.raises(ValueError, match=r"a\.json line 1: decoder 'top_p=7' is not valid"):
        specs_in(bad)


def test_cli_from_generations_errors(tmp_path, capsys):
    from entcal.cli import main

    rc = main(["compare", "--from-generations", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert rc == 2 and "no generations" in capsys.readouterr().err


def test_generation_rows_cover_every_spec_prompt_and_sample():
    rows = generation_rows([[1, 2], [3]], ["a", "b"], samples=2)
    assert len(rows) == 8
    assert {(r["spec"], r["prompt"], r["sample"]) for r in rows} == {
        (s, i, j) for s in "ab" for i in range(2) for j in range(2)
    }
    assert rows[2]["prompt_token_ids"] == [3]


def test_checks_flag_rows_the_decoder_did_not_sample(markov_run, tmp_path):
    """Ancestral tokens labelled as greedy (what an engine that skipped a row's decoder would
    give) fall outside the greedy support, and rows without the engine's raw log-probs leave the
    engine-vs-scorer check empty rather than perfect."""
    model, tok, prompts, human, _, _, generations = markov_run
    folder = tmp_path / "mislabelled"
    write_generations(folder, prompts, {"top_k=1": {"tokens": generations["ancestral"]["tokens"]}},
                      samples=2)  # fmt: skip
    cfg = CompareConfig(
        out=tmp_path / "out", model="markov-8", decoders="top_k=1", n=6, length=10,
        prompt_tokens=4, samples=2, batch_size=4, progress=False, plots=False,
        from_generations=str(folder),
    )  # fmt: skip
    res = run_compare(cfg, model=model, tokenizer=tok, pairs=(prompts, human))
    check = res["decoders"]["top_k=1"]["check"]
    assert check["max_abs_raw_logprob_diff_generate_vs_score"] is None
    assert check["tokens_outside_decoder"] > 0.3


def test_ray_parts_remember_which_predictor_made_them(tmp_path):
    """A Ray generations part records each decoder's cache key: a part made by another predictor
    at the same spec is not reused (parts without the record count as made by the spec alone)."""
    from entcal.decoding import parse
    from entcal.eval.compare_generation import _CONTENT, _same_content

    class FileDecoder:  # what matters here: a cache key beyond the spec
        def __init__(self, key):
            self.key = key

        def cache_key(self):
            return self.key

    part = tmp_path / "part-a"
    part.mkdir()
    plain = {"top_p=0.9": parse("top_p=0.9")}
    assert _same_content(part, "top_p=0.9", plain)  # no record: the spec alone
    assert not _same_content(part, "calibrated", {"calibrated": FileDecoder("calibrated#1")})
    (part / _CONTENT).write_text(json.dumps({"calibrated": "calibrated#1"}))
    assert _same_content(part, "calibrated", {"calibrated": FileDecoder("calibrated#1")})
    assert not _same_content(part, "calibrated", {"calibrated": FileDecoder("calibrated#2")})
    assert not _same_content(part, "top_k=5", plain)  # not a decoder of this run
