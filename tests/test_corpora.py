"""Calibration text: named sets, disjoint splits, deterministic sampling, clear refusals."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from vllm_miprun.pipeline import corpora
from tiny_models import tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.mark.parametrize("name", ["wiki", "c4"])
def test_named_splits_are_disjoint(name):
    calibration = set(corpora.split_documents(name, "calibration")["text"])
    evaluation = set(corpora.split_documents(name, "evaluation")["text"])
    assert len(calibration) > 50 and len(evaluation) > 50
    assert not calibration & evaluation


def test_wiki_split_follows_documented_ranges():
    docs = corpora.load_documents("wiki")
    assert len(docs) == 2349
    assert corpora.split_documents("wiki", "calibration")["text"] == docs.select(range(1000))["text"]
    assert corpora.split_documents("wiki", "evaluation")["text"][0] == docs[1500]["text"]


def test_sampling_is_deterministic_and_seeded(tokenizer):
    first = corpora.sample_token_windows(tokenizer, "wiki", 4, 64, seed=0)
    again = corpora.sample_token_windows(tokenizer, "wiki", 4, 64, seed=0)
    other = corpora.sample_token_windows(tokenizer, "wiki", 4, 64, seed=1)
    assert first.shape == (4, 64) and first.dtype == np.int64
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_windows_do_not_overlap(tokenizer):
    windows = corpora.sample_token_windows(tokenizer, "c4", 3, 128, seed=0)
    joined = [tuple(w) for w in windows]
    assert len(set(joined)) == 3


def test_too_short_set_is_refused(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words of text\n")
    with pytest.raises(corpora.CorpusError, match=r"samples x seq_len = 8 x 256"):
        corpora.sample_token_windows(tokenizer, str(path), 8, 256, seed=0)


@pytest.mark.parametrize("content, message", [(b"", "holds no text"), (b"\x00\x01\x02binary", "binary"),
                                              (b"\xff\xfe\xfa not utf8", "not UTF-8")])
def test_empty_or_binary_file_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(corpora.CorpusError, match=message):
        corpora.load_documents(str(path))


def test_local_text_file_and_saved_dataset(tmp_path, tokenizer):
    text = tmp_path / "mine.txt"
    text.write_text("First paragraph about cats.\n\nSecond paragraph about dogs.\n")
    assert corpora.load_documents(str(text))["text"] == ["First paragraph about cats.", "Second paragraph about dogs."]
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["alpha beta gamma " * 50, "", "   \n  "]}).save_to_disk(str(folder))
    assert len(corpora.load_documents(str(folder))) == 1
    assert corpora.sample_token_windows(tokenizer, str(folder), 2, 16, seed=0).shape == (2, 16)


def test_documents_are_joined_by_the_eos_token(tokenizer, tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("alpha beta\n\ngamma delta\n")
    eos = tokenizer.eos_token_id
    assert eos is not None and eos != tokenizer.bos_token_id  # else the test could not tell them apart
    a, b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("alpha beta", "gamma delta"))
    window = corpora.sample_token_windows(tokenizer, str(path), 1, len(a) + 1 + len(b), seed=0)[0].tolist()
    assert window in ([*a, eos, *b], [*b, eos, *a])


def test_evaluation_reads_its_documents_in_order_whatever_the_seed(tokenizer):
    first = corpora.split_documents("c4", "evaluation")[0]["text"]
    windows = corpora.sample_token_windows(tokenizer, "c4", 1, 32, seed=0, part="evaluation")
    assert windows[0].tolist() == tokenizer(first, add_special_tokens=False)["input_ids"][:32]
    np.testing.assert_array_equal(corpora.sample_token_windows(tokenizer, "c4", 1, 32, seed=5, part="evaluation"),
                                  windows)


def test_validation_starts_at_the_document_after_calibrations_last(tokenizer, tmp_path):
    """Calibration that ends exactly at a document's end (its EOS included) reads no further document."""
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa",
                                  "lambda mu"]) + "\n")
    docs = corpora.split_documents(str(path), "calibration")["text"]
    order = np.random.default_rng(0).permutation(len(docs))  # calibration's seeded order
    ids = [tokenizer(docs[int(i)], add_special_tokens=False)["input_ids"] for i in order]
    exact = len(ids[0]) + 1 + len(ids[1]) + 1
    validation = corpora.validation_token_windows(tokenizer, str(path), 1, exact, 0, 1, len(ids[2]))
    assert validation[0].tolist() == ids[2]


def test_unknown_name_and_foreign_folder(tmp_path):
    with pytest.raises(corpora.CorpusError, match="does not exist"):
        corpora.load_documents("wikipedia-2024")
    with pytest.raises(corpora.CorpusError, match="datasets.load_from_disk"):
        corpora.load_documents(str(tmp_path))


def test_evaluation_only_from_named_sets(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("some text")
    with pytest.raises(corpora.CorpusError, match="evaluation text comes only"):
        corpora.split_documents(str(path), "evaluation")


@pytest.mark.parametrize("name", sorted(corpora.HELD_OUT_FILES))
def test_evaluation_only_domains_evaluate_on_the_second_half_only(name, tokenizer):
    first, second = corpora.held_out_halves(name)
    text = (corpora.bundled.corpus_dir() / corpora.HELD_OUT_FILES[name]).read_text(encoding="utf-8")
    assert first + second == text and second.startswith("\n")
    assert abs(len(first) - len(text) / 2) < 0.05 * len(text)  # cut near the middle
    assert corpora.split_documents(name, "evaluation")["text"] == [second]
    windows = corpora.sample_token_windows(tokenizer, name, 2, 64, 0, part="evaluation")
    ids = tokenizer(second, add_special_tokens=False)["input_ids"]
    assert windows.reshape(-1).tolist() == ids[:128]  # the evaluation half, from its start
    with pytest.raises(corpora.CorpusError, match="evaluation-only domain"):
        corpora.split_documents(name, "calibration")
