import json

import pytest

from entcal import corpora


def test_default_corpus_gives_200_pairs_of_128_plus_256(smollm2_tokenizer):
    corpus = corpora.load_corpus()
    assert corpus.name == "pydoc"
    pairs = corpora.make_pairs(
        corpus, smollm2_tokenizer, prompt_tokens=128, continuation_tokens=256
    )
    assert len(pairs) >= 200
    for pair in pairs:
        assert len(pair.prompt_ids) == 128
        assert len(pair.continuation_ids) == 256


def test_pairs_are_deterministic_for_a_seed(smollm2_tokenizer):
    corpus = corpora.load_corpus()
    a = corpora.make_pairs(corpus, smollm2_tokenizer, n=10, seed=3)
    b = corpora.make_pairs(corpus, smollm2_tokenizer, n=10, seed=3)
    c = corpora.make_pairs(corpus, smollm2_tokenizer, n=10, seed=4)
    assert a == b
    assert [p.document_index for p in a] != [p.document_index for p in c]


def test_pairs_join_back_to_the_document_prefix(smollm2_tokenizer):
    corpus = corpora.load_corpus()
    pair = corpora.make_pairs(
        corpus, smollm2_tokenizer, n=1, prompt_tokens=16, continuation_tokens=32
    )[0]
    full = smollm2_tokenizer(corpus.documents[pair.document_index])["input_ids"]
    assert list(pair.prompt_ids + pair.continuation_ids) == full[:48]


def test_short_documents_are_skipped(smollm2_tokenizer):
    docs = ["tiny", "word " * 400]
    pairs = corpora.make_pairs(docs, smollm2_tokenizer, prompt_tokens=8, continuation_tokens=16)
    assert [p.document_index for p in pairs] == [1]


def test_at_least_names_how_many_documents_qualify(smollm2_tokenizer):
    docs = ["short", "word " * 40, "word " * 40]
    kw = dict(prompt_tokens=8, continuation_tokens=16)
    assert len(corpora.make_pairs(docs, smollm2_tokenizer, at_least=2, **kw)) == 2
    with pytest.raises(ValueError, match=r"only 2 documents have 24 tokens .* 3 are asked"):
        corpora.make_pairs(docs, smollm2_tokenizer, at_least=3, **kw)
    with pytest.raises(ValueError, match="no document has 24 tokens"):
        corpora.make_pairs(["short"], smollm2_tokenizer, at_least=1, **kw)


def test_split_is_disjoint_and_deterministic():
    corpus = corpora.load_corpus()
    train, test = corpus.split("train"), corpus.split("test")
    assert len(train) + len(test) == len(corpus)
    assert not set(train.documents) & set(test.documents)
    assert corpus.split("test").documents == test.documents
    with pytest.raises(ValueError, match="train"):
        corpus.split("validation")


def test_txt_loader(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("First document,\nstill first.\n\nSecond document.\n\n\n\nThird.\n")
    corpus = corpora.load_corpus(path)
    assert corpus.documents == ("First document,\nstill first.", "Second document.", "Third.")


def test_jsonl_loader(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert corpora.load_corpus(path, field="body").documents == ("one", "two")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpora.load_corpus(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "name,content", [("empty.txt", ""), ("blank.txt", "\n \n\n"), ("empty.jsonl", "\n")]
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="holds no text"):
        corpora.load_corpus(path)


def test_jsonl_line_without_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: no field 'text'"):
        corpora.load_corpus(path)


def test_jsonl_bad_json(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("{not json}\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        corpora.load_corpus(path)


def test_bad_arguments(smollm2_tokenizer):
    with pytest.raises(ValueError, match="prompt_tokens"):
        corpora.make_pairs(["x"], smollm2_tokenizer, prompt_tokens=0)
    with pytest.raises(ValueError, match="no documents"):
        corpora.make_pairs([], smollm2_tokenizer)
