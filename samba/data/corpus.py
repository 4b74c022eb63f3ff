"""Corpus sources: the Hugging Face Hub, a local folder of text files, or a generated corpus.

Every source returns `{"train": rows, "valid": rows, "test": rows}` in the form the Hub's
WikiText configs use: one row per line, a non-blank row ends with "\\n" and keeps its
leading space, and a blank (whitespace-only) line is the empty string "". Headings such as
" = Title = \\n" are ordinary rows. Local files are brought to this form, so a local copy of
a Hub corpus gives the same rows as the Hub.
"""

from __future__ import annotations

import bisect
import codecs
import itertools
import random
import tempfile
from pathlib import Path

SPLITS = ("train", "valid", "test")

# Split names of the Hub's WikiText configs, keyed by the names this package uses.
_HUB_SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}
_CHECK_CHUNK_BYTES = 1 << 20
# "utf-8-sig" reads plain UTF-8 and also drops a byte-order mark that Windows editors write.
_ENCODING = "utf-8-sig"


class CorpusError(ValueError):
    """A corpus problem that the user can fix (missing or unreadable files, missing splits)."""


class HubUnreachableError(CorpusError):
    """The Hugging Face Hub could not be reached, or does not serve the requested dataset."""


def to_hub_row(row: str) -> str:
    """Return `row` in the Hub form: "" when blank, otherwise the row with "\\n" appended unless it ends with one."""
    if not row.strip():
        return ""
    return row if row.endswith("\n") else row + "\n"


def load_local_corpus(folder: str | Path) -> dict[str, list[str]]:
    """Load train.txt, valid.txt and test.txt from `folder` with `datasets.load_dataset("text")`.

    The files are checked first (present, not empty, not only whitespace, UTF-8 text) so a
    problem is reported as one CorpusError that names the file. `datasets` writes an Arrow
    copy of the text into its cache. This function points that cache at a temporary folder
    that is deleted on return, so nothing is left in the user's data folder or in
    ~/.cache, and a stale cache entry can never stand in for an edited file.
    `keep_in_memory=True` loads the rows into memory, so nothing maps the deleted files.
    """
    import datasets  # Deferred: importing datasets takes about a second.

    folder = Path(folder).expanduser()
    if not folder.exists():
        raise CorpusError(f"corpus folder not found: {folder} (create it with train.txt, valid.txt and test.txt)")
    if not folder.is_dir():
        raise CorpusError(f"corpus folder is not a directory: {folder} (point to the folder that contains train.txt, valid.txt and test.txt)")
    paths = {split: folder / f"{split}.txt" for split in SPLITS}
    for split, path in paths.items():
        _check_text_file(path, split)

    with tempfile.TemporaryDirectory(prefix="samba-datasets-") as cache_dir:
        dataset = datasets.load_dataset(
            "text",
            data_files={split: str(path) for split, path in paths.items()},
            encoding=_ENCODING,
            cache_dir=cache_dir,
            keep_in_memory=True,
        )
        return {split: [to_hub_row(row) for row in dataset[split]["text"]] for split in SPLITS}


def load_hub_corpus(name: str = "Salesforce/wikitext", config: str | None = "wikitext-2-raw-v1") -> dict[str, list[str]]:
    """Download (or read from the Hugging Face cache) a Hub text dataset with train/validation/test splits.

    Raises HubUnreachableError when the Hub cannot be reached (no network, HF_HUB_OFFLINE=1,
    a server error) or does not serve `name` (unknown or gated dataset). Rows are brought to
    the Hub form, which leaves the WikiText configs' rows unchanged. `name` may also be a
    local folder laid out like a Hub dataset (train, validation and test files), which
    `datasets` loads the same way.
    """
    import datasets  # Deferred: importing datasets takes about a second.
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import httpx  # The HTTP client huggingface_hub uses (httpx2 in 2.x).

    # What datasets 5.2 / huggingface_hub 2.4 raise when the Hub is out of reach: datasets
    # turns most network failures into the builtin ConnectionError (HF_HUB_OFFLINE=1 raises
    # its subclass OfflineModeIsEnabled), and data-file downloads can raise the others.
    unreachable = (ConnectionError, TimeoutError, httpx.RequestError, HfHubHTTPError,
                   LocalEntryNotFoundError, DatasetNotFoundError)
    try:
        dataset = datasets.load_dataset(name, config)
    except unreachable as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise HubUnreachableError(
            f"dataset {name} (config {config}) could not be loaded from the Hugging Face Hub: "
            f"{type(error).__name__}: {cause}"
        ) from error

    corpus = {}
    for split, hub_split in _HUB_SPLIT_NAMES.items():
        if hub_split not in dataset:
            raise CorpusError(f"dataset {name} (config {config}) has no {hub_split!r} split "
                              f"(it has {sorted(dataset)}): choose a dataset with train, validation and test splits")
        if "text" not in dataset[hub_split].column_names:
            raise CorpusError(f"dataset {name} (config {config}) has no 'text' column "
                              f"(it has {dataset[hub_split].column_names}): choose a plain-text dataset")
        corpus[split] = [to_hub_row(row) for row in dataset[hub_split]["text"]]
        _check_has_text(corpus[split], f"the {hub_split} split of {name} (config {config})")
    return corpus


def _check_text_file(path: Path, split: str) -> None:
    """Raise CorpusError unless `path` is a non-empty UTF-8 text file with some non-whitespace text."""
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path} (the folder needs train.txt, valid.txt and test.txt)")
    if not path.is_file():
        raise CorpusError(f"corpus file is not a regular file: {path} (replace it with the {split} text, one line per sentence or paragraph)")

    # Plain UTF-8 here, so error offsets count from the first byte even when a BOM is present.
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    has_text = False
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_CHECK_CHUNK_BYTES)
            final = len(chunk) < _CHECK_CHUNK_BYTES
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise CorpusError(f"corpus file is binary, not text: {path} has a NUL byte at offset {offset + nul} "
                                  f"(replace it with the {split} text as a UTF-8 file)")
            pending = len(decoder.getstate()[0])  # Bytes of an incomplete character kept from the last chunk.
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as error:
                raise CorpusError(f"corpus file is not valid UTF-8: {path} has byte "
                                  f"0x{error.object[error.start]:02x} at offset {offset - pending + error.start} "
                                  f"(convert it to UTF-8, for example with iconv -t UTF-8)") from None
            if offset == 0:
                text = text.removeprefix("\ufeff")
            has_text = has_text or (bool(text) and not text.isspace())
            offset += len(chunk)
            if final:
                break
    if offset == 0:
        raise CorpusError(f"corpus file is empty: {path} (add the {split} text, one line per sentence or paragraph)")
    if not has_text:
        raise CorpusError(f"corpus file contains only whitespace: {path} (add the {split} text, one line per sentence or paragraph)")


def _check_has_text(rows: list[str], where: str) -> None:
    if not any(rows):
        raise CorpusError(f"no text in {where}: every row is blank (use a corpus with text in every split)")


# Synthetic corpus --------------------------------------------------------------------------------

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_GRAMMAR_SEED = "samba-synthetic-grammar-v1"
_SENTENCES_PER_ARTICLE = (20, 60)
_SENTENCES_PER_PARAGRAPH = (3, 8)


def make_synthetic_corpus(seed: int, n_train: int = 20000, n_valid: int = 2000, n_test: int = 2000) -> dict[str, list[str]]:
    """Generate a corpus from a fixed probabilistic grammar over 318 made-up words.

    Needs no files and no network, and gives a model clear structure to learn:

    - Vocabulary (318 types): 64 nouns in singular and plural form (128 types, the plural
      adds "s"). 32 transitive and 16 intransitive verbs, also in both numbers (96 types,
      suffixes "t" and "n"). 32 adjectives, 16 adverbs (suffix "ly"), 8 prepositions,
      8 determiners, 24 capitalised names, 3 conjunctions, and ",", "." and "=".
    - Sentence: clause [conjunction clause] ".", sometimes after an opening prepositional
      phrase and ",". Clause: subject noun phrase, then a verb phrase whose verb agrees in
      number with the subject head noun, even across an attached prepositional phrase.
      Noun phrase: a name, or determiner, 0 to 2 adjectives and a noun, where the
      determiner fixes the noun's gender class and number. Each transitive verb prefers
      6 object nouns. Sentences run from 3 to about 40 words.
    - Within each word class, word frequencies follow Zipf's law (weight 1/rank), and 16
      fixed phrases of 3 to 5 words recur at clause ends.
    - Layout as in WikiText: articles of 20 to 60 sentences open with a heading row
      " = Name noun = " and a blank row, paragraphs of 3 to 8 sentences end with a blank
      row, and each sentence is one row.

    n_train, n_valid and n_test count sentence rows; headings and blank rows come on top.
    The grammar is the same for every seed, and the seed only drives sampling, so
    the same seed gives identical rows. Sampling uses only `random.Random.random()`, whose
    sequence for a given seed Python keeps stable across versions.
    """
    for name, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of sentences, got {value!r}")
    grammar = _Grammar()
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    return {split: grammar.rows(random.Random(f"samba-synthetic:{seed}:{split}"), size) for split, size in sizes.items()}


class _Weighted:
    """Words with Zipf weights (1/rank), sampled with one `random()` draw."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, len(words) + 1)))

    def sample(self, rng: random.Random) -> str:
        index = bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])
        return self.words[min(index, len(self.words) - 1)]


class _Grammar:
    """The fixed vocabulary and rules of `make_synthetic_corpus`."""

    def __init__(self) -> None:
        builder = random.Random(_GRAMMAR_SEED)
        syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
        stems = _shuffled([a + b for a in syllables for b in syllables], builder)
        short = _shuffled(syllables, builder)

        noun_stems, stems = stems[:64], stems[64:]
        # Nouns split into two gender classes, each a list of (singular, plural) pairs.
        self.nouns = [[(stem, stem + "s") for stem in noun_stems[:32]], [(stem, stem + "s") for stem in noun_stems[32:]]]
        self.adjectives = _Weighted(stems[:32])
        transitive, intransitive, adverbs = stems[32:64], stems[64:80], stems[80:96]
        self.transitive = [(stem + "t", stem + "n") for stem in transitive]
        self.intransitive = [(stem + "t", stem + "n") for stem in intransitive]
        self.adverbs = _Weighted([stem + "ly" for stem in adverbs])
        self.prepositions = _Weighted(short[:8])
        # Two determiners for each (gender, number).
        self.determiners = {(gender, number): _Weighted(short[8 + 4 * gender + 2 * number:][:2])
                            for gender in (0, 1) for number in (0, 1)}
        self.conjunctions = _Weighted(short[16:19])
        self.names = _Weighted([(stem + syllable).capitalize() for stem, syllable in zip(stems[96:120], short[19:43])])

        self.noun_index = _Weighted(list(range(32)))
        self.transitive_index = _Weighted(list(range(len(self.transitive))))
        self.intransitive_index = _Weighted(list(range(len(self.intransitive))))
        all_nouns = [(gender, index) for gender in (0, 1) for index in range(32)]
        self.preferred_objects = [_Weighted(_shuffled(all_nouns, builder)[:6]) for _ in self.transitive]
        self.phrases = [self._phrase(builder, length) for length in [3, 4, 5, 3] * 4]

    def vocabulary(self) -> set[str]:
        words = {",", ".", "="}
        words.update(form for gender in self.nouns for pair in gender for form in pair)
        words.update(form for pair in self.transitive + self.intransitive for form in pair)
        for weighted in (self.adjectives, self.adverbs, self.prepositions, self.conjunctions, self.names,
                         *self.determiners.values()):
            words.update(weighted.words)
        return words

    def rows(self, rng: random.Random, n_sentences: int) -> list[str]:
        rows: list[str] = []
        written = 0
        while written < n_sentences:
            article = min(_uniform_int(rng, *_SENTENCES_PER_ARTICLE), n_sentences - written)
            rows += [_row(["=", self.names.sample(rng), self._noun(rng, gender=0, number=0), "="]), ""]
            while article > 0:
                paragraph = min(_uniform_int(rng, *_SENTENCES_PER_PARAGRAPH), article)
                rows += [_row(self._sentence(rng)) for _ in range(paragraph)] + [""]
                article -= paragraph
                written += paragraph
        return rows

    def _sentence(self, rng: random.Random) -> list[str]:
        words = []
        if rng.random() < 0.15:
            words += self._prepositional_phrase(rng, depth=1) + [","]
        words += self._clause(rng)
        if rng.random() < 0.25:
            words += [self.conjunctions.sample(rng)] + self._clause(rng)
        return words + ["."]

    def _clause(self, rng: random.Random) -> list[str]:
        subject, number = self._noun_phrase(rng, depth=0)
        if rng.random() < 0.6:
            verb = self.transitive_index.sample(rng)
            gender, index = self.preferred_objects[verb].sample(rng) if rng.random() < 0.8 else (
                _uniform_int(rng, 0, 1), self.noun_index.sample(rng))
            obj, _ = self._noun_phrase(rng, depth=1, head=(gender, index))
            words = subject + [self.transitive[verb][number]] + obj
            if rng.random() < 0.3:
                words.append(self.adverbs.sample(rng))
        else:
            words = subject + [self.intransitive[self.intransitive_index.sample(rng)][number]]
            if rng.random() < 0.5:
                words.append(self.adverbs.sample(rng))
            if rng.random() < 0.3:
                words += self._prepositional_phrase(rng, depth=1)
        if rng.random() < 0.1:
            words += self.phrases[int(rng.random() * len(self.phrases))]
        return words

    def _noun_phrase(self, rng: random.Random, depth: int, head: tuple[int, int] | None = None) -> tuple[list[str], int]:
        """Return the words of a noun phrase and its number (0 singular, 1 plural)."""
        if head is None and rng.random() < 0.15:
            return [self.names.sample(rng)], 0
        gender, index = head if head is not None else (_uniform_int(rng, 0, 1), self.noun_index.sample(rng))
        number = _uniform_int(rng, 0, 1)
        draw = rng.random()
        n_adjectives = 0
        if draw >= 0.5:
            n_adjectives = 1 if draw < 0.85 else 2
        words = [self.determiners[gender, number].sample(rng)]
        words += [self.adjectives.sample(rng) for _ in range(n_adjectives)]
        words.append(self.nouns[gender][index][number])
        if depth < 2 and rng.random() < 0.2:
            words += self._prepositional_phrase(rng, depth + 1)
        return words, number

    def _prepositional_phrase(self, rng: random.Random, depth: int) -> list[str]:
        return [self.prepositions.sample(rng)] + self._noun_phrase(rng, depth)[0]

    def _noun(self, rng: random.Random, gender: int, number: int) -> str:
        return self.nouns[gender][self.noun_index.sample(rng)][number]

    def _phrase(self, builder: random.Random, length: int) -> list[str]:
        """Build one fixed phrase: a preposition, determiner, adjectives, noun, and an adverb if room is left."""
        gender, number = _uniform_int(builder, 0, 1), _uniform_int(builder, 0, 1)
        words = [self.prepositions.sample(builder), self.determiners[gender, number].sample(builder)]
        words += [self.adjectives.sample(builder) for _ in range(max(length - 4, 0))]
        words.append(self._noun(builder, gender, number))
        if len(words) < length:
            words.append(self.adverbs.sample(builder))
        return words


def _row(words: list[str]) -> str:
    return " " + " ".join(words) + " \n"


def _uniform_int(rng: random.Random, low: int, high: int) -> int:
    """Draw an integer in [low, high] from one `random()` call."""
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def _shuffled(items: list, rng: random.Random) -> list:
    """Fisher-Yates shuffle driven by `random()` alone, so the order is stable across Python versions."""
    items = list(items)
    for last in range(len(items) - 1, 0, -1):
        other = min(int(rng.random() * (last + 1)), last)
        items[last], items[other] = items[other], items[last]
    return items
