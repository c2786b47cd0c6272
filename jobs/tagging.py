"""Entity tagging data: CoNLL and JSONL readers, tag schemes normalised to IOB2, spans, entity-level metrics.

    read_tagged(path)                       -> sentences (tokens, tags, the line of each token)
    normalize(sentences, "auto", repair)    -> the same sentences in IOB2, with what was converted or repaired
    entity_metrics(true_tags, pred_tags)    -> seqeval's entity-level precision / recall / F1, default and strict

Files: CoNLL-style text (one ``token<TAB>tag`` per line, or whitespace-separated columns whose last one is
the tag, as in CoNLL-2003; a blank line between sentences; ``-DOCSTART-`` lines skipped), and JSONL with
``tokens`` and ``tags`` lists per line. Schemes: IOB1 (``I-`` starts a span, ``B-`` only separates two
adjacent spans of one type), IOB2 (every span starts with ``B-``) and BIOES (``S-`` single, ``E-`` end).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from jobs.errors import InputError

SCHEMES = ("auto", "iob1", "iob2", "bioes")
TAGGED_FORMATS = (".conll", ".jsonl", ".json", ".iob", ".bio", ".txt", ".tsv")  # split files a folder may hold
PREFIXES = {"B", "I", "E", "S"}


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    lines: list[int] = field(default_factory=list)  # 1-based line of each token in ``source``
    source: str = ""

    def where(self, i: int) -> str:
        """``file:line`` of token ``i`` (for error messages)."""
        return f"{self.source}:{self.lines[i]}" if self.lines else f"{self.source} (token {i + 1})"


@dataclass
class Normalized:
    sentences: list[Sentence]
    scheme: str  # the scheme the input was read as
    repaired: int = 0  # I-X tags that began a span and became B-X (--repair-tags)
    converted: int = 0  # tags rewritten by the scheme conversion (IOB1 or BIOES to IOB2)


def split_tag(tag: str, where: str) -> tuple[str, str | None]:
    """("O", None) or (prefix, type) of a tag such as ``B-person``; anything else is an error naming ``where``."""
    if tag == "O":
        return "O", None
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in PREFIXES or not kind:
        raise InputError(f"{where}: tag {tag!r} is neither O nor B-/I-/E-/S- followed by an entity type")
    return prefix, kind


def read_conll(path: Path) -> list[Sentence]:
    """Sentences of a CoNLL-style file; a line without a tag column is an error naming file:line."""
    path = Path(path)
    sentences: list[Sentence] = []
    tokens, tags, lines = [], [], []

    def flush() -> None:
        if tokens:
            sentences.append(Sentence(list(tokens), list(tags), list(lines), str(path)))
            tokens.clear(), tags.clear(), lines.clear()

    with open(path, encoding="utf-8", newline="") as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            if line.startswith("-DOCSTART-"):
                flush()
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            token, tag = parts[0], parts[-1].strip() if len(parts) > 1 else ""
            if not token.strip() or not tag:
                raise InputError(f"{path}:{number}: expected a token and a tag column (token<TAB>tag), "
                                 f"got {line[:60]!r}")
            tokens.append(token.strip())
            tags.append(tag)
            lines.append(number)
    flush()
    return sentences


def read_jsonl(path: Path) -> list[Sentence]:
    """Sentences of a JSONL file with ``tokens`` and ``tags`` per line (an empty sentence is kept)."""
    path = Path(path)
    sentences = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not JSON ({e.msg})") from None
            tokens, tags = (row.get(k) if isinstance(row, dict) else None for k in ("tokens", "tags"))
            if not isinstance(tokens, list) or not isinstance(tags, list):
                raise InputError(f"{path}:{number}: expected an object with 'tokens' and 'tags' lists")
            if len(tokens) != len(tags):
                raise InputError(f"{path}:{number}: {len(tokens)} tokens but {len(tags)} tags")
            sentences.append(Sentence([str(t) for t in tokens], [str(t) for t in tags], [number] * len(tokens),
                                      str(path)))
    return sentences


def read_tagged(path: Path) -> list[Sentence]:
    """Sentences of a tagged file: JSONL by suffix, else CoNLL-style text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not path.read_bytes().strip():
        raise InputError(f"{path}: file is empty")
    return read_jsonl(path) if path.suffix.lower() in (".jsonl", ".json") else read_conll(path)


def _starts_span(prev: tuple[str, str | None], cur: tuple[str, str | None]) -> bool:
    """Whether an ``I-`` tag ``cur`` after ``prev`` begins a span (does not continue one of its type)."""
    return prev[1] != cur[1] or prev[0] in ("O", "E", "S")


def detect_scheme(sentences: Sequence[Sentence]) -> str:
    """``bioes`` when E- or S- tags occur; ``iob1`` when some I- tag begins a span and every B- tag follows a
    span of its own type (B- only separates); else ``iob2``."""
    i_starts, b_after_other = 0, 0
    for s in sentences:
        prev: tuple[str, str | None] = ("O", None)
        for i, tag in enumerate(s.tags):
            cur = split_tag(tag, s.where(i))
            if cur[0] in ("E", "S"):
                return "bioes"
            if cur[0] == "I" and _starts_span(prev, cur):
                i_starts += 1
            if cur[0] == "B" and (prev[1] != cur[1] or prev[0] == "O"):
                b_after_other += 1
            prev = cur
    return "iob1" if i_starts and not b_after_other else "iob2"


def normalize(sentences: Sequence[Sentence], scheme: str = "auto", repair: bool = False) -> Normalized:
    """The sentences with IOB2 tags.

    IOB1 and BIOES are converted (counted in ``converted``). Under IOB2 (and in converted BIOES) an ``I-X``
    that does not continue an X span is an error naming file:line, or becomes ``B-X`` with ``repair``
    (counted in ``repaired``).
    """
    if scheme not in SCHEMES:
        raise InputError(f"tag scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    read_as = detect_scheme(sentences) if scheme == "auto" else scheme
    out, repaired, converted = [], 0, 0
    for s in sentences:
        tags, prev = [], ("O", None)
        for i, tag in enumerate(s.tags):
            prefix, kind = split_tag(tag, s.where(i))
            if read_as != "bioes" and prefix in ("E", "S"):
                raise InputError(f"{s.where(i)}: tag {tag!r} is BIOES, but the tag scheme is {read_as}")
            if prefix in ("E", "S"):
                new = ("B" if prefix == "S" else "I", kind)
                converted += 1
            elif prefix == "I" and _starts_span(prev, (prefix, kind)):
                if read_as == "iob1":
                    converted += 1
                elif repair:
                    repaired += 1
                else:
                    raise InputError(f"{s.where(i)}: {tag} does not continue a {kind} span (IOB2 starts every span "
                                     f"with B-{kind}); fix the tag, pass --tag-scheme iob1 if the file is IOB1, or "
                                     "--repair-tags to make it B-")
                new = ("B", kind)
            else:
                new = (prefix, kind)
            tags.append("O" if new[0] == "O" else f"{new[0]}-{new[1]}")
            prev = (prefix, kind)
        out.append(Sentence(s.tokens, tags, s.lines, s.source))
    return Normalized(out, read_as, repaired, converted)


def spans(tags: Sequence[str]) -> list[tuple[int, int, str]]:
    """(first token, end token exclusive, type) of each entity in an IOB2 tag sequence; a stray I-X (as a
    model may predict) begins a span, as seqeval's default mode reads it."""
    out: list[tuple[int, int, str]] = []
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, t = tag.partition("-")
        if start is not None and (prefix != "I" or t != kind):
            out.append((start, i, kind))
            start, kind = None, None
        if prefix in ("B", "I") and start is None:
            start, kind = i, t
    return out


def entity_counts(sentences: Sequence[Sentence]) -> dict[str, int]:
    """Entities per type (IOB2 tags), sorted by type."""
    counts = Counter(kind for s in sentences for _, _, kind in spans(s.tags))
    return dict(sorted(counts.items()))


def tag_names(sentences: Sequence[Sentence]) -> list[str]:
    """The tag set: O first, then B-/I- of each type, types sorted (ids follow this order)."""
    kinds = sorted({t.partition("-")[2] for s in sentences for t in s.tags if t != "O"})
    return ["O", *(f"{p}-{k}" for k in kinds for p in ("B", "I"))]


def entity_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision / recall / F1 with exact span match, as fractions: seqeval's default mode (the
    conlleval definition the field publishes) at the top and per type, with micro and macro averages; the same
    under seqeval's strict IOB2 mode in ``strict``."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    if len(true_tags) != len(pred_tags) or any(len(a) != len(b) for a, b in zip(true_tags, pred_tags)):
        raise ValueError("true and predicted tags must have the same sentences and lengths")
    true, pred = [list(t) for t in true_tags], [list(p) for p in pred_tags]

    def report(**kw: Any) -> dict[str, Any]:
        rows = classification_report(true, pred, output_dict=True, zero_division=0, **kw)
        per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                        "f1": float(v["f1-score"]), "support": int(v["support"])}
                    for k, v in rows.items() if not k.endswith(" avg")}
        avg = {name.split()[0]: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                                 "f1": float(v["f1-score"]), "support": int(v["support"])}
               for name, v in rows.items() if name.endswith(" avg")}
        micro = avg.get("micro", {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0})
        return {"entity_precision": micro["precision"], "entity_recall": micro["recall"], "entity_f1": micro["f1"],
                "macro_f1": avg.get("macro", {}).get("f1", 0.0), "per_type": per_type, "averages": avg}

    default = report()
    strict = report(mode="strict", scheme=IOB2)
    return {**default, "sentences": len(true), "strict": strict}


def clean_sentences(sentences: Sequence[Sentence]) -> tuple[list[Sentence], Counter, dict[str, list[list[str]]]]:
    """IOB2 sentences cleaned for training: tokens in Unicode NFC; a token holding whitespace split into
    words (the words after the first continue its tag: ``I-X``), a blank token dropped with its tag; empty
    sentences, exact duplicates (same tokens and tags) and sentences whose tokens occur with other tags
    dropped. Returns (kept, counts of what was split or dropped, conflicting text -> its tag sequences)."""
    import unicodedata

    dropped: Counter = Counter()
    seen: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    order: list[Sentence] = []
    for s in sentences:
        tokens, tags, lines = [], [], []
        for i, token in enumerate(s.tokens):
            words = unicodedata.normalize("NFC", token).split()
            if not words:
                dropped["blank_token"] += 1
                continue
            if len(words) > 1:
                dropped["token_split_at_whitespace"] += 1
            inside = "O" if s.tags[i] == "O" else "I-" + s.tags[i].partition("-")[2]
            tokens += words
            tags += [s.tags[i]] + [inside] * (len(words) - 1)
            lines += [s.lines[i] if s.lines else 0] * len(words)
        if not tokens:
            dropped["empty_sentence"] += 1
            continue
        variants = seen.setdefault(tuple(tokens), set())
        if tuple(tags) in variants:
            dropped["duplicate"] += 1
            continue
        variants.add(tuple(tags))
        order.append(Sentence(tokens, tags, lines, s.source))
    conflicting = {t for t, v in seen.items() if len(v) > 1}
    kept = [s for s in order if tuple(s.tokens) not in conflicting]
    dropped["conflicting_tags"] += len(order) - len(kept)
    return kept, dropped, {" ".join(t): sorted(list(v) for v in seen[t]) for t in sorted(conflicting)}


# ----------------------------------------------------------------------------------------------------------
# Words to model input: the first piece of each word carries its tag (the others are ignored in the loss and
# in predictions); a sentence whose pieces do not fit ``max_length`` is cut into consecutive windows of whole
# words, so that every word is trained on and predicted once.

IGNORE = -100  # label of pieces that are not a word's first (torch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Window:
    sentence: int  # index of the sentence in the batch
    first_word: int  # index of the window's first word in the sentence
    ids: tuple[int, ...]  # input ids, special tokens included
    starts: tuple[int, ...]  # position in ``ids`` of each word's first piece (one per word of the window)


def word_windows(tokenizer: Any, sentences: Sequence[Sequence[str]], max_length: int) -> list[Window]:
    """The windows of each sentence (an empty sentence has none): consecutive words whose pieces, with the
    special tokens, fit ``max_length``; a single word longer than that keeps its first pieces, and a word
    the tokenizer makes no piece of reads as the unknown token. Words become pieces as
    ``is_split_into_words`` makes them (a fast tokenizer's word ids find each word's first piece)."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a word beside the special tokens")
    filled = [i for i, s in enumerate(sentences) if len(s)]
    if not filled:
        return []
    enc = tokenizer([list(sentences[i]) for i in filled], is_split_into_words=True, add_special_tokens=False)
    cuts: list[tuple[int, int, int]] = []  # (sentence, first word, end word) of each window
    words: list[list[str]] = []
    for row, si in enumerate(filled):
        counts = [0] * len(sentences[si])
        for word in enc.word_ids(row):
            if word is not None:
                counts[word] += 1
        sentence = [w if counts[k] else tokenizer.unk_token for k, w in enumerate(sentences[si])]
        counts = [min(max(c, 1), room) for c in counts]
        start = 0
        while start < len(counts):
            end, used = start, 0
            while end < len(counts) and (end == start or used + counts[end] <= room):
                used += counts[end]
                end += 1
            cuts.append((si, start, end))
            words.append(sentence[start:end])
            start = end
    full = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    out = []
    for r, (si, start, end) in enumerate(cuts):
        starts: dict[int, int] = {}
        for pos, word in enumerate(full.word_ids(r)):
            if word is not None and word not in starts:
                starts[word] = pos
        out.append(Window(si, start, tuple(full["input_ids"][r]), tuple(starts[k] for k in range(end - start))))
    return out


def encode_windows(windows: Sequence[Window], pad_id: int, tags: Sequence[Sequence[int]] | None = None
                   ) -> dict[str, Any]:
    """A padded numpy batch of ``windows``: input_ids, attention_mask and, given each sentence's tag ids,
    ``labels`` (the tag on each word's first piece, ``IGNORE`` elsewhere)."""
    import numpy as np

    width = max((len(w.ids) for w in windows), default=0)
    ids = np.full((len(windows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(windows), width), dtype=np.int64)
    labels = np.full((len(windows), width), IGNORE, dtype=np.int64)
    for r, w in enumerate(windows):
        ids[r, :len(w.ids)] = w.ids
        mask[r, :len(w.ids)] = 1
        if tags is not None:
            labels[r, list(w.starts)] = tags[w.sentence][w.first_word:w.first_word + len(w.starts)]
    batch = {"input_ids": ids, "attention_mask": mask}
    if tags is not None:
        batch["labels"] = labels
    return batch


def tag_sentences(forward: Any, tokenizer: Any, sentences: Sequence[Sequence[str]], max_length: int, tags: int,
                  batch_size: int = 64) -> list[Any]:
    """Per sentence (a list of words), the (words, ``tags``) logits at each word's first piece: the sentences
    cut into windows (``word_windows``), ``forward(numpy batch) -> (windows, pieces, tags)`` run on batches of
    ``batch_size`` windows, and the windows put back together (``word_logits``)."""
    import numpy as np

    windows = word_windows(tokenizer, sentences, max_length)
    width = max((len(w.ids) for w in windows), default=1)
    rows = []
    for i in range(0, len(windows), batch_size):
        batch = encode_windows(windows[i:i + batch_size], tokenizer.pad_token_id)
        if "token_type_ids" in tokenizer.model_input_names:  # an exported graph may take them
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        rows += [np.pad(x, ((0, width - x.shape[0]), (0, 0))) for x in forward(batch)]
    stacked = np.stack(rows) if rows else np.zeros((0, width, tags), np.float32)
    return word_logits(windows, stacked, [len(s) for s in sentences])


def word_logits(windows: Sequence[Window], logits: Any, lengths: Sequence[int]) -> list[Any]:
    """Per sentence, the (words, tags) logits at each word's first piece, put back together from the windows;
    ``logits`` is (windows, pieces, tags) and ``lengths`` the words of each sentence."""
    import numpy as np

    classes = logits.shape[-1]
    out = [np.zeros((n, classes), dtype=np.float32) for n in lengths]
    for r, w in enumerate(windows):
        out[w.sentence][w.first_word:w.first_word + len(w.starts)] = logits[r, list(w.starts)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Raw text to words with character offsets, and predicted tags back to character spans (predict, serving).

def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) of each whitespace-separated word of ``text`` (``text[start:end] == word``).

    Prepared data stores each sentence as its words joined by single spaces, so a stored or re-sent sentence
    splits back into exactly its words. In raw text, punctuation attached to a word stays in it (the
    tokenizer still cuts it into its own pieces); ``char_spans`` leaves it out of an entity's offsets.
    (Splitting punctuation off, as CoNLL tokenizers do, changed the words of 5.2% of WNUT-17's sentences:
    HTML entities, abbreviations, emoticons.)"""
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]


_LEADING = "([{\"“‘'"
_TRAILING = ",;:!?)]}\"”’'"


def char_spans(text: str, words: Sequence[tuple[str, int, int]], tag_ids: Sequence[int], probs: Any,
               tag_names: Sequence[str]) -> list[dict[str, Any]]:
    """Entities as ``{"start", "end", "type", "text", "score"}`` with character offsets into ``text`` (without
    quotes, brackets or a comma-like mark around the span's words); the score is the mean probability of the
    span's predicted word tags."""
    tags = [tag_names[int(i)] for i in tag_ids]
    out = []
    for first, end, kind in spans(tags):
        start, stop = words[first][1], words[end - 1][2]
        while stop - start > 1 and text[stop - 1] in _TRAILING:  # "York," -> "York" (a "." may end "U.S.")
            stop -= 1
        while stop - start > 1 and text[start] in _LEADING:
            start += 1
        score = float(sum(probs[k][int(tag_ids[k])] for k in range(first, end)) / (end - first))
        out.append({"start": start, "end": stop, "type": kind, "text": text[start:stop], "score": round(score, 6)})
    return out
