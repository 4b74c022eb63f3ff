"""Corpus loading: local folders in the Hub row form, user errors, the Hub offline, the synthetic corpus."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from samba.data.corpus import (
    SPLITS,
    CorpusError,
    HubUnreachableError,
    load_hub_corpus,
    load_local_corpus,
    make_synthetic_corpus,
    to_hub_row,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wikitext_valid(data_dir: Path) -> Path:
    path = data_dir / "wikitext-2" / "valid.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found; set SAMBA_TEST_DATA to the folder with wikitext-2/")
    return path


def _write_splits(folder: Path, texts: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (folder / f"{split}.txt").write_bytes(texts.get(split, b" the cat sat \n"))
    return folder


def test_ptb_folder_row_counts(ptb_dir: Path) -> None:
    corpus = load_local_corpus(ptb_dir)

    assert list(corpus) == list(SPLITS)
    assert len(corpus["train"]) == 42068
    assert len(corpus["valid"]) == 3370
    assert len(corpus["test"]) == 3761
    first_line = (ptb_dir / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)[0]
    assert corpus["train"][0] == first_line
    assert all(row.endswith("\n") and row.strip() for split in SPLITS for row in corpus[split])


def test_local_rows_match_hub_rows(tmp_path: Path, wikitext_valid: Path) -> None:
    text = wikitext_valid.read_bytes()
    folder = _write_splits(tmp_path / "wiki", {split: text for split in SPLITS})

    corpus = load_local_corpus(folder)

    # The Hub's WikiText builder keeps each line with its "\n" and turns a blank line into "".
    lines = text.decode("utf-8").splitlines(keepends=True)
    hub_rows = [line if line.strip() else "" for line in lines]
    for split in SPLITS:
        assert corpus[split] == hub_rows
    assert len(hub_rows) == 3760
    assert hub_rows.count("") == 1299
    assert corpus["train"][:3] == ["", " = Homarus gammarus = \n", ""]


def test_local_load_leaves_folder_unchanged(tmp_path: Path) -> None:
    folder = _write_splits(tmp_path / "corpus", {})

    load_local_corpus(folder)

    assert sorted(path.name for path in folder.iterdir()) == ["test.txt", "train.txt", "valid.txt"]


def test_local_crlf_bom_and_missing_final_newline(tmp_path: Path) -> None:
    folder = _write_splits(tmp_path / "corpus", {"train": b"\xef\xbb\xbf a b \r\n\r\n c d"})

    corpus = load_local_corpus(folder)

    assert corpus["train"] == [" a b \n", "", " c d\n"]


def test_to_hub_row_is_idempotent() -> None:
    for row in [" a b ", " a b \n", "", " ", " \n", "\n"]:
        once = to_hub_row(row)
        assert to_hub_row(once) == once
    assert to_hub_row(" \n") == ""
    assert to_hub_row(" a b ") == " a b \n"


@pytest.mark.parametrize(
    ("case", "content", "expected"),
    [
        ("missing", None, "not found"),
        ("empty", b"", "empty"),
        ("whitespace", b"  \n\t\n \n", "only whitespace"),
        ("binary", b" text \n\x00\x01\x02", "binary"),
        ("latin1", " caf\xe9 au lait \n".encode("latin-1"), "not valid UTF-8"),
        ("truncated", " caf\xe9".encode("utf-8")[:-1], "not valid UTF-8"),
        ("directory", "dir", "not a regular file"),
    ],
)
def test_bad_valid_file_raises(tmp_path: Path, case: str, content: bytes | str | None, expected: str) -> None:
    folder = _write_splits(tmp_path / case, {})
    path = folder / "valid.txt"
    path.unlink()
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)

    with pytest.raises(CorpusError) as raised:
        load_local_corpus(folder)

    message = str(raised.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_invalid_utf8_reports_offset(tmp_path: Path) -> None:
    folder = _write_splits(tmp_path / "corpus", {"test": b" ok \n" + b"x" * 2_000_000 + b"\xff\n"})

    with pytest.raises(CorpusError, match=r"byte 0xff at offset 2000005"):
        load_local_corpus(folder)


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="corpus folder not found") as raised:
        load_local_corpus(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(raised.value)


def test_folder_that_is_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(" a \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="not a directory"):
        load_local_corpus(path)


def test_hub_unreachable_error_is_corpus_error() -> None:
    assert issubclass(HubUnreachableError, CorpusError)
    assert issubclass(CorpusError, ValueError)


def test_hub_loader_maps_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder laid out like a Hub dataset repository goes through the same
    # load_dataset(name, config) call and split handling as the Hub.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    repo.mkdir()
    for hub_split, text in (("train", " a b \n\n = H = \n"), ("validation", " c \n"), ("test", " \n d e")):
        (repo / f"{hub_split}.txt").write_text(text, encoding="utf-8")

    corpus = load_hub_corpus(str(repo), None)

    assert corpus == {"train": [" a b \n", "", " = H = \n"], "valid": [" c \n"], "test": ["", " d e\n"]}


def test_hub_loader_missing_split_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    repo.mkdir()
    for hub_split in ("train", "test"):
        (repo / f"{hub_split}.txt").write_text(" a \n", encoding="utf-8")

    with pytest.raises(CorpusError, match="has no 'validation' split"):
        load_hub_corpus(str(repo), None)


_HUB_SCRIPT = """
from samba.data.corpus import HubUnreachableError, load_hub_corpus
try:
    load_hub_corpus()
except HubUnreachableError as error:
    print("UNREACHABLE", error)
else:
    print("LOADED")
"""


def _run_hub_script(tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), **env_overrides)
    return subprocess.run([sys.executable, "-c", _HUB_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_hub_offline_mode_raises_unreachable(tmp_path: Path) -> None:
    result = _run_hub_script(tmp_path, HF_HUB_OFFLINE="1")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("UNREACHABLE"), result.stdout + result.stderr
    assert "Salesforce/wikitext" in result.stdout
    assert "ConnectionError" in result.stdout
    assert result.stdout.count("\n") == 1


@pytest.mark.slow
def test_hub_refused_connection_raises_unreachable(tmp_path: Path) -> None:
    # A loopback port with no listener refuses at once, but huggingface_hub 2.4 retries
    # five times with backoff (about 23 s in all) before giving up.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run_hub_script(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("UNREACHABLE"), result.stdout + result.stderr


def test_synthetic_same_seed_same_rows() -> None:
    first = make_synthetic_corpus(7, n_train=300, n_valid=40, n_test=40)
    second = make_synthetic_corpus(7, n_train=300, n_valid=40, n_test=40)
    other = make_synthetic_corpus(8, n_train=300, n_valid=40, n_test=40)

    assert first == second
    assert first["train"] != other["train"]
    assert first["train"] != first["valid"][: len(first["train"])]


def test_synthetic_rows_in_hub_form() -> None:
    corpus = make_synthetic_corpus(0, n_train=500, n_valid=50, n_test=60)

    for split, n_sentences in (("train", 500), ("valid", 50), ("test", 60)):
        rows = corpus[split]
        assert all(row == "" or (row.startswith(" ") and row.endswith(" \n")) for row in rows)
        headings = [row for row in rows if row.startswith(" = ")]
        sentences = [row for row in rows if row and not row.startswith(" = ")]
        assert len(sentences) == n_sentences
        assert all(row.split()[-1] == "." for row in sentences)
        assert headings
        assert "" in rows


def test_synthetic_vocabulary_and_lengths() -> None:
    corpus = make_synthetic_corpus(0, n_train=20000)
    words = Counter(word for row in corpus["train"] for word in row.split())
    lengths = [len(row.split()) for row in corpus["train"] if row and not row.startswith(" = ")]

    assert len(words) == 318
    assert min(lengths) == 3
    assert max(lengths) >= 30


def test_synthetic_bigram_beats_unigram() -> None:
    corpus = make_synthetic_corpus(3, n_train=5000, n_valid=500, n_test=10)

    def tokens(rows: list[str]) -> list[str]:
        return [word for row in rows if row for word in [*row.split(), "<eos>"]]

    train, valid = tokens(corpus["train"]), tokens(corpus["valid"])
    vocab = set(train) | set(valid)
    unigram = Counter(train)
    bigram = Counter(zip(train, train[1:]))
    alpha = 0.1  # Add-alpha smoothing, so unseen events on valid keep a finite cost.

    def unigram_nll(word: str) -> float:
        return -math.log((unigram[word] + alpha) / (len(train) + alpha * len(vocab)))

    def bigram_nll(previous: str, word: str) -> float:
        return -math.log((bigram[previous, word] + alpha) / (unigram[previous] + alpha * len(vocab)))

    unigram_ppl = math.exp(sum(unigram_nll(word) for word in valid[1:]) / (len(valid) - 1))
    bigram_ppl = math.exp(sum(bigram_nll(p, w) for p, w in zip(valid, valid[1:])) / (len(valid) - 1))
    assert bigram_ppl < 0.5 * unigram_ppl, (bigram_ppl, unigram_ppl)


def test_synthetic_rejects_nonpositive_size() -> None:
    with pytest.raises(ValueError, match="n_valid"):
        make_synthetic_corpus(0, n_train=10, n_valid=0)
