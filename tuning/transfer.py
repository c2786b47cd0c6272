"""The transfer set of a compression search: texts beyond the train split that the teacher labels.

A student learns from the teacher's outputs, not from gold labels, so any in-domain text can teach it. Two
sources, both built once per search (by the driver) and shared by every trial:

- **augmentations** of the train texts: word masking, deletion, adjacent swaps and span mixing (a span of
  one train text replaced by a span of another; the teacher's soft label says what the mix means);
- **unlabelled texts** a user has (``--unlabelled FILE``: logs, tickets; one text per line, or a CSV /
  TSV / JSONL / parquet file with a text column).

Either kind of text that occurs in the validation or test split is dropped and counted (the choice is made
on validation and reported on test: neither may leak into training), as are duplicates of train texts and
of each other. Everything is deterministic under the seed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from jobs.errors import InputError
from jobs.prepare import normalize_text
from jobs.tasks import TEXT_COLUMN_GUESSES

AUGMENTATIONS = ("mask", "delete", "swap", "span_mix")


@dataclass
class TransferSet:
    """Texts without gold labels, and what was dropped on the way (reason -> count)."""

    texts: list[str] = field(default_factory=list)
    sources: Counter = field(default_factory=Counter)  # kind -> texts kept
    dropped: Counter = field(default_factory=Counter)

    def add(self, texts: Sequence[str], kind: str, blocked: set[str], seen: set[str]) -> None:
        """Adds ``texts`` of one ``kind``, dropping those in ``blocked`` (evaluation texts) or in ``seen``."""
        for text in texts:
            key = _key(text)
            if not key:
                self.dropped[f"{kind}_empty"] += 1
            elif key in blocked:
                self.dropped[f"{kind}_in_validation_or_test"] += 1
            elif key in seen:
                self.dropped[f"{kind}_duplicate"] += 1
            else:
                seen.add(key)
                self.texts.append(text)
                self.sources[kind] += 1


def _key(text: str) -> str:
    """What counts as the same text: normalized whitespace, case-folded."""
    return normalize_text(text).casefold()


def augment_text(text: str, other: str, op: str, rng: np.random.Generator, mask_token: str,
                 rate: float = 0.15) -> str:
    """One augmentation ``op`` of ``text`` (``other`` is the span donor of span_mix)."""
    words = text.split()
    n = len(words)
    if n == 0:
        return text
    if op == "mask":
        k = max(1, round(rate * n))
        for i in rng.choice(n, size=min(k, n), replace=False):
            words[i] = mask_token
    elif op == "delete" and n > 1:
        k = min(max(1, round(rate * n)), n - 1)
        drop = set(rng.choice(n, size=k, replace=False).tolist())
        words = [w for i, w in enumerate(words) if i not in drop]
    elif op == "swap" and n > 1:
        i = int(rng.integers(n - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    elif op == "span_mix":
        donor = other.split()
        if donor:
            length = max(1, n // 2)
            start = int(rng.integers(n - length + 1))
            d_len = min(len(donor), max(1, len(donor) // 2))
            d_start = int(rng.integers(len(donor) - d_len + 1))
            words = words[:start] + donor[d_start:d_start + d_len] + words[start + length:]
    return " ".join(words)


def augmentations(texts: Sequence[str], copies: int, seed: int, mask_token: str) -> list[str]:
    """``copies`` augmentations of every text, each with one operation drawn at random (seeded)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(copies):
        for text in texts:
            op = AUGMENTATIONS[int(rng.integers(len(AUGMENTATIONS)))]
            other = texts[int(rng.integers(len(texts)))] if len(texts) > 1 else text
            out.append(augment_text(text, other, op, rng, mask_token))
    return out


def read_unlabelled(path: Path | str) -> list[str]:
    """The texts of an unlabelled file: ``.txt`` (one per line) or a table with a text column.

    Raises InputError naming the file if it is missing, empty or has no recognisable text column.
    """
    from jobs.sources import FORMATS, read_table

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"--unlabelled {str(path)!r}: no such file")
    if path.suffix.lower() in ("", ".txt", ".text"):
        raw = path.read_bytes()
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise InputError(f"--unlabelled {str(path)!r}: line {line} is not UTF-8; re-encode the file") from None
        texts = [t for t in (normalize_text(x) for x in lines) if t]
    elif path.suffix.lower() in FORMATS:
        try:
            table = read_table(path)
        except InputError as e:
            raise InputError(f"--unlabelled {e}") from None
        names = table.column_names
        lowered = {n.lower(): n for n in names}
        column = next((lowered[g] for g in TEXT_COLUMN_GUESSES if g in lowered), names[0] if len(names) == 1 else None)
        if column is None:
            raise InputError(f"--unlabelled {str(path)!r}: no text column among {names} (name it one of "
                             f"{list(TEXT_COLUMN_GUESSES)}, or pass a .txt file with one text per line)")
        texts = [t for t in (normalize_text(str(x)) for x in table.column(column).to_pylist() if x is not None) if t]
    else:
        raise InputError(f"--unlabelled {str(path)!r}: unsupported format {path.suffix!r}; use .txt (one text "
                         f"per line) or one of {', '.join(FORMATS)}")
    if not texts:
        raise InputError(f"--unlabelled {str(path)!r}: the file holds no texts")
    return texts


def build_transfer_set(train: Sequence[str], evaluation: Sequence[str], *, copies: int, seed: int,
                       mask_token: str, unlabelled: Sequence[str] = ()) -> TransferSet:
    """Unlabelled texts first (a user's own data), then ``copies`` augmentations of each train text; neither
    may equal a validation/test text (``evaluation``), a train text or an earlier transfer text."""
    blocked = {_key(t) for t in evaluation}
    seen = {_key(t) for t in train}
    out = TransferSet()
    out.add(unlabelled, "unlabelled", blocked, seen)
    if copies:
        out.add(augmentations(list(train), copies, seed, mask_token), "augmented", blocked, seen)
    return out
