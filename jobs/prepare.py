"""Prepare stage: collect, clean, de-duplicate, label-map and split labelled text.

    slimray prepare --source ../shared/data/banking77 --task intent --out runs/b77/data
    python -m jobs.prepare --config jobs/configs/prepare.yaml --set limit=500

Output folder: ``train.parquet``, ``validation.parquet``, ``test.parquet`` (columns text, label, label_id),
``labels.json`` (id → name order), ``manifest.json`` (rows and label counts per split, rows dropped by
reason, sha256 of every input, the maximum sequence length chosen from the data).
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from jobs.artifacts import atomic_dir, check_can_write, manifest, write_json
from jobs.config import Location, NameOrPath, StrictModel, run_cli
from jobs.errors import InputError
from jobs.modeling import load_tokenizer
from jobs.sources import load_source
from jobs.tasks import TEXT_COLUMN_GUESSES, Task, get_task

log = logging.getLogger("slimray.prepare")

SPLITS = ("train", "validation", "test")


class PrepareConfig(StrictModel):
    """Clean, de-duplicate, label-map and split labelled text into parquet splits with a manifest."""

    source: NameOrPath = Field(description="CSV/TSV/JSONL/parquet file, folder of split files (train.*, validation.*, "
                        "test.*), or a Hugging Face dataset id")
    out: Location = Field(description="Output folder (written atomically): a path, or a storage URI "
                          "(s3://bucket/path, gs://bucket/path) every node can read")
    task: str = Field(default="intent", description="Task name from the registry (intent, sentiment, ner)")
    text_column: str | None = Field(default=None, description="Text column (default: guessed from common names)")
    label_column: str | None = Field(default=None, description="Label column (default: guessed from common names)")
    column_names: list[str] | None = Field(
        default=None, description="Comma-separated column names for a headerless CSV/TSV, e.g. id,rating,text")
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5,
                                       description="Share of train cut (stratified) as validation when the source has none")
    test_fraction: float = Field(default=0.1, ge=0, lt=0.5,
                                 description="Share of train cut (stratified) as test when the source has none; 0 for no test split")
    limit: int | None = Field(default=None, ge=1, description="Smoke knob: keep at most this many rows per split "
                              "(spread over the labels)")
    tokenizer: NameOrPath = Field(default="minilm", description="Tokenizer used to choose the maximum sequence length")
    length_percentile: float = Field(default=99.0, gt=0, le=100,
                                     description="Max sequence length = this percentile of train token lengths")
    tag_scheme: Literal["auto", "iob1", "iob2", "bioes"] = Field(
        default="auto", description="ner: tag scheme of the files (auto: BIOES if E-/S- tags occur, IOB1 if I- "
        "starts spans and B- only separates them, else IOB2); every scheme is stored as IOB2")
    repair_tags: bool = Field(default=False, description="ner: an IOB2 I-X that does not continue an X span "
                              "becomes B-X (counted in the manifest) instead of an error naming file:line")
    seed: int = Field(default=0, description="Seed of every shuffle and split")
    overwrite: bool = Field(default=False, description="Replace an existing output folder")

    @field_validator("column_names", mode="before")
    @classmethod
    def _split_commas(cls, v):
        return [c.strip() for c in v.split(",")] if isinstance(v, str) else v


def normalize_text(text: str) -> str:
    """Unicode NFC and collapsed whitespace (line breaks and tabs become single spaces)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def pick_column(table: pa.Table, wanted: str | None, guesses: tuple[str, ...], role: str, where: str) -> str:
    names = table.column_names
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{where}: no {role} column {wanted!r}; columns are {names}")
        return wanted
    lowered = {n.lower(): n for n in names}
    for g in guesses:
        if g in lowered:
            return lowered[g]
    raise InputError(f"{where}: cannot tell which column holds the {role}; columns are {names}; "
                     f"pass --{role}-column")


def balanced_head(indices_by_label: dict[str, list[int]], n: int, rng: np.random.Generator) -> list[int]:
    """Up to ``n`` indices taken round-robin over labels (so a small slice still covers the labels)."""
    ranked = []
    for label in sorted(indices_by_label):
        idx = list(indices_by_label[label])
        rng.shuffle(idx)
        ranked += [(rank, label, i) for rank, i in enumerate(idx)]
    ranked.sort()
    return sorted(i for _, _, i in ranked[:n])


def stratified_split(labels: list[str], fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Per-label seeded split; a label with a single example stays in the kept part."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    kept, cut = [], []
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        k = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        cut += idx[:k]
        kept += idx[k:]
    return sorted(kept), sorted(cut)


def clean_split(texts: list[str], labels: list[str], split: str) -> tuple[list[str], list[str], Counter, dict]:
    """Normalizes, drops empty rows, exact duplicates and texts with conflicting labels."""
    dropped: Counter = Counter()
    rows: dict[str, set[str]] = defaultdict(set)
    order: list[tuple[str, str]] = []
    for text, label in zip(texts, labels):
        text = normalize_text(text)
        if not text:
            dropped["empty_text"] += 1
            continue
        if label in rows[text]:
            dropped["duplicate"] += 1
            continue
        rows[text].add(label)
        order.append((text, label))
    conflicting = {t for t, ls in rows.items() if len(ls) > 1}
    if conflicting:
        log.warning("%s: %d texts carry conflicting labels; dropping them (listed in conflicts.jsonl)",
                    split, len(conflicting))
    kept = [(t, lab) for t, lab in order if t not in conflicting]
    dropped["conflicting_label"] += len(order) - len(kept)
    return [t for t, _ in kept], [lab for _, lab in kept], dropped, {t: sorted(rows[t]) for t in sorted(conflicting)}


def extract(table: pa.Table, cfg: PrepareConfig, task: Task, where: str) -> tuple[list[str], list[str]]:
    text_col = pick_column(table, cfg.text_column, TEXT_COLUMN_GUESSES, "text", where)
    label_col = pick_column(table, cfg.label_column, task.label_column_guesses, "label", where)
    texts = ["" if t is None else str(t) for t in table.column(text_col).to_pylist()]
    labels = task.to_label_names(table.column(label_col).to_pylist(), label_col)
    return texts, labels


def token_length_stats(texts: list, tokenizer_name: str, percentile: float, words: bool = False) -> dict:
    """The max length chosen from train's token lengths; ``words``: ``texts`` are pre-split word lists (a
    tagger's sentences, which are windowed later when longer)."""
    tokenizer = load_tokenizer(tokenizer_name)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False, is_split_into_words=words)["input_ids"]])
    cap = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    chosen = int(np.ceil(np.percentile(lengths, percentile) / 8) * 8)  # multiples of 8 suit the kernels
    return {
        "max_length": min(max(chosen, 8), cap),
        "tokenizer": tokenizer_name,
        "percentile": percentile,
        "token_lengths": {"p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
                          "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max())},
        "truncated_train_rows": int((lengths > min(max(chosen, 8), cap)).sum()),
    }


# The splits while they are being prepared: split -> texts, split -> labels (same order), split -> drop counts.
Texts = dict[str, list[str]]
Labels = dict[str, list[str]]
Dropped = dict[str, Counter]


def _keep(texts: Texts, labels: Labels, split: str, keep: list[int]) -> None:
    texts[split] = [texts[split][i] for i in keep]
    labels[split] = [labels[split][i] for i in keep]


def clean_sources(tables: dict[str, pa.Table], inputs: list[dict], cfg: PrepareConfig,
                  task: Task) -> tuple[Texts, Labels, Dropped, dict[str, dict[str, list[str]]]]:
    """Each source split's texts and label names, cleaned (see ``clean_split``)."""
    texts, labels, dropped, conflicts = {}, {}, {}, {}
    for split, table in tables.items():
        where = next((i["path"] for i in inputs if i["split"] == split), cfg.source)
        raw_texts, raw_labels = extract(table, cfg, task, where)
        texts[split], labels[split], dropped[split], conflicts[split] = clean_split(raw_texts, raw_labels, split)
        if not texts[split]:
            raise InputError(f"{where}: no rows left after cleaning ({dict(dropped[split])})")
    return texts, labels, dropped, conflicts


def cut_missing_splits(texts: Texts, labels: Labels, dropped: Dropped, cfg: PrepareConfig,
                       rng: np.random.Generator) -> None:
    """Splits the source lacks are cut from train, stratified and seeded."""
    for split, fraction in (("test", cfg.test_fraction), ("validation", cfg.validation_fraction)):
        if split in texts or fraction == 0:
            continue
        kept, cut = stratified_split(labels["train"], fraction, rng)
        texts[split] = [texts["train"][i] for i in cut]
        labels[split] = [labels["train"][i] for i in cut]
        _keep(texts, labels, "train", kept)
        dropped.setdefault(split, Counter())
        log.info("cut a stratified %s split of %d rows from train", split, len(cut))


def limit_splits(texts: Texts, labels: Labels, limit: int, rng: np.random.Generator) -> None:
    """Smoke runs: at most ``limit`` rows per split, spread over the labels."""
    for split in texts:
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, label in enumerate(labels[split]):
            by_label[label].append(i)
        _keep(texts, labels, split, balanced_head(by_label, limit, rng))


def drop_leaks(texts: Texts, labels: Labels, dropped: Dropped) -> None:
    """An evaluation text seen in train (or a test text seen in validation) is dropped from it."""
    seen = set(texts["train"])
    for split in ("validation", "test"):
        if split not in texts:
            continue
        keep = [i for i, t in enumerate(texts[split]) if t not in seen]
        dropped[split]["leaked_from_train" if split == "validation" else "leaked_from_train_or_validation"] += (
            len(texts[split]) - len(keep))
        _keep(texts, labels, split, keep)
        seen |= set(texts[split])


def label_set(texts: Texts, labels: Labels, dropped: Dropped, limited: bool) -> list[str]:
    """The label names of train, sorted; evaluation labels never seen in train are an error (or, in a
    ``--limit`` slice that may miss rare train labels, dropped and counted)."""
    names = sorted(set(labels["train"]))
    known = set(names)
    if len(names) < 2:
        raise InputError(f"train split has {len(names)} label(s) {names}; a classifier needs at least 2")
    for split in ("validation", "test"):
        unseen = Counter(lab for lab in labels.get(split, []) if lab not in known)
        if unseen and not limited:
            raise InputError(f"{split} split has labels never seen in train: "
                             f"{dict(unseen.most_common(5))} (label: rows); fix the labels or drop those rows")
        if unseen:
            keep = [i for i, lab in enumerate(labels[split]) if lab in known]
            dropped[split]["label_not_in_limited_train"] += len(labels[split]) - len(keep)
            _keep(texts, labels, split, keep)
    return names


def write_splits(staging: Path, texts: Texts, labels: Labels, label_names: list[str],
                 conflicts: dict[str, dict[str, list[str]]]) -> dict[str, dict]:
    """The parquet splits, labels.json and conflicts.jsonl; returns each split's row and label counts."""
    label_to_id = {name: i for i, name in enumerate(label_names)}
    splits_info = {}
    for split in (s for s in SPLITS if s in texts):
        pq.write_table(pa.table({
            "text": pa.array(texts[split], pa.string()),
            "label": pa.array(labels[split], pa.string()),
            "label_id": pa.array([label_to_id[lab] for lab in labels[split]], pa.int64()),
        }), staging / f"{split}.parquet")
        splits_info[split] = {"rows": len(texts[split]), "label_counts": dict(sorted(Counter(labels[split]).items()))}
    write_json(staging / "labels.json", label_names)
    with open(staging / "conflicts.jsonl", "w", encoding="utf-8") as f:
        for split, texts_labels in conflicts.items():
            for text, names in texts_labels.items():
                f.write(json.dumps({"split": split, "text": text, "labels": names}) + "\n")
    return splits_info


def main(cfg: PrepareConfig) -> Path | str:
    task = get_task(cfg.task)
    check_can_write(cfg.out, cfg.overwrite)
    if task.kind == "tagging":
        return prepare_tagged(cfg, task)
    tables, inputs = load_source(cfg.source, cfg.column_names)
    rng = np.random.default_rng(cfg.seed)

    texts, labels, dropped, conflicts = clean_sources(tables, inputs, cfg, task)
    cut_missing_splits(texts, labels, dropped, cfg, rng)
    if cfg.limit:
        limit_splits(texts, labels, cfg.limit, rng)
    drop_leaks(texts, labels, dropped)
    label_names = label_set(texts, labels, dropped, limited=bool(cfg.limit))
    # Sources are often sorted by label (BANKING77's train file is): train is written in a seeded random
    # order, so that any reader that streams it (a shuffle buffer, the first N rows) sees every label.
    _keep(texts, labels, "train", list(rng.permutation(len(texts["train"]))))
    lengths = token_length_stats(texts["train"], cfg.tokenizer, cfg.length_percentile)

    with atomic_dir(cfg.out, cfg.overwrite) as staging:
        splits_info = write_splits(staging, texts, labels, label_names, conflicts)
        write_json(staging / "manifest.json", manifest(
            "prepare",
            cfg.model_dump(mode="json"),
            task=task.name,
            source=cfg.source,
            inputs=inputs,
            labels=label_names,
            splits=splits_info,
            dropped={s: dict(c) for s, c in dropped.items()},
            conflicting_texts={s: len(c) for s, c in conflicts.items()},
            **lengths,
        ))
    log.info("prepared %s: %s; %d labels; max_length %d", cfg.out,
             ", ".join(f"{s} {i['rows']}" for s, i in splits_info.items()), len(label_names), lengths["max_length"])
    return cfg.out


def tagged_sources(source: str) -> tuple[dict[str, Path], list[dict]]:
    """The tagged files of ``source`` (a file: train; a folder: its train / dev / test files) and their
    provenance."""
    from jobs.sources import find_split_files, provenance
    from jobs.tagging import TAGGED_FORMATS

    path = Path(source).expanduser()
    if path.is_dir():
        files = find_split_files(path, TAGGED_FORMATS)
    elif path.is_file():
        files = {"train": path}
    else:
        raise InputError(f"source {source!r} does not exist (expected a CoNLL / JSONL file or a folder of split "
                         "files such as train.conll, dev.conll, test.conll)")
    return files, provenance(files)


def prepare_tagged(cfg: PrepareConfig, task: Task) -> Path | str:
    """``main`` for tagging data: read, normalise to IOB2, clean, split, drop leaks, write.

    Splits hold ``text`` (the words joined by single spaces), ``tokens``, ``tags`` and ``tag_ids``;
    ``labels.json`` is the tag set (O, then B-/I- per type); the manifest counts entities per type per split.
    """
    from jobs.tagging import clean_sentences, detect_scheme, entity_counts, normalize, read_tagged, tag_names

    files, inputs = tagged_sources(cfg.source)
    read = {split: read_tagged(path) for split, path in files.items()}
    scheme = cfg.tag_scheme
    if scheme == "auto":  # one scheme for every file, detected on all of them
        scheme = detect_scheme([s for sentences in read.values() for s in sentences])
    sentences, dropped, conflicts, fixes = {}, {}, {}, {}
    for split, rows in read.items():
        normalized = normalize(rows, scheme, cfg.repair_tags)
        fixes[split] = {"repaired_tags": normalized.repaired, "converted_tags": normalized.converted}
        sentences[split], dropped[split], conflicts[split] = clean_sentences(normalized.sentences)
        if not sentences[split]:
            raise InputError(f"{files[split]}: no sentences left after cleaning ({dict(dropped[split])})")
    rng = np.random.default_rng(cfg.seed)
    for split, fraction in (("test", cfg.test_fraction), ("validation", cfg.validation_fraction)):
        if split in sentences or fraction == 0:
            continue
        order = rng.permutation(len(sentences["train"]))
        k = max(1, int(round(fraction * len(order))))
        if k >= len(order):
            raise InputError(f"train has {len(order)} sentences: too few to cut a {split} split from")
        sentences[split] = [sentences["train"][i] for i in sorted(order[:k])]
        sentences["train"] = [sentences["train"][i] for i in sorted(order[k:])]
        dropped.setdefault(split, Counter())
        log.info("cut a %s split of %d sentences from train", split, k)
    if cfg.limit:
        for split in sentences:
            keep = sorted(rng.permutation(len(sentences[split]))[:cfg.limit])
            sentences[split] = [sentences[split][i] for i in keep]
    seen = {" ".join(s.tokens) for s in sentences["train"]}
    for split in ("validation", "test"):
        if split in sentences:
            kept = [s for s in sentences[split] if " ".join(s.tokens) not in seen]
            reason = "leaked_from_train" if split == "validation" else "leaked_from_train_or_validation"
            dropped[split][reason] += len(sentences[split]) - len(kept)
            sentences[split] = kept
            seen |= {" ".join(s.tokens) for s in kept}
    names = tag_names(sentences["train"])
    if len(names) < 3:
        raise InputError(f"train split has no entity tags (tags: {names}); a tagger needs at least one type")
    for split in ("validation", "test"):
        unseen = Counter(t for s in sentences.get(split, []) for t in s.tags if t not in names)
        if unseen and not cfg.limit:
            raise InputError(f"{split} split has tags never seen in train: {dict(unseen.most_common(5))} "
                             "(tag: words); fix the tags or drop those sentences")
        if unseen:
            before = len(sentences[split])
            sentences[split] = [s for s in sentences[split] if set(s.tags) <= set(names)]
            dropped[split]["tag_not_in_limited_train"] += before - len(sentences[split])
    sentences["train"] = [sentences["train"][i] for i in rng.permutation(len(sentences["train"]))]
    lengths = token_length_stats([s.tokens for s in sentences["train"]], cfg.tokenizer, cfg.length_percentile,
                                 words=True)
    lengths["train_sentences_over_max_length"] = lengths.pop("truncated_train_rows")  # windowed, not truncated
    tag_to_id = {t: i for i, t in enumerate(names)}

    with atomic_dir(cfg.out, cfg.overwrite) as staging:
        splits_info = {}
        for split in (s for s in SPLITS if s in sentences):
            rows = sentences[split]
            pq.write_table(pa.table({
                "text": pa.array([" ".join(s.tokens) for s in rows], pa.string()),
                "tokens": pa.array([s.tokens for s in rows], pa.list_(pa.string())),
                "tags": pa.array([s.tags for s in rows], pa.list_(pa.string())),
                "tag_ids": pa.array([[tag_to_id[t] for t in s.tags] for s in rows], pa.list_(pa.int64())),
            }), staging / f"{split}.parquet")
            splits_info[split] = {"rows": len(rows), "words": sum(len(s.tokens) for s in rows),
                                  "entity_counts": entity_counts(rows), **fixes.get(split, {})}
        write_json(staging / "labels.json", names)
        with open(staging / "conflicts.jsonl", "w", encoding="utf-8") as f:
            for split, texts_tags in conflicts.items():
                for text, variants in texts_tags.items():
                    f.write(json.dumps({"split": split, "text": text, "tags": variants}) + "\n")
        write_json(staging / "manifest.json", manifest(
            "prepare", cfg.model_dump(mode="json"), task=task.name, source=cfg.source, inputs=inputs,
            labels=names, tag_scheme={"read_as": scheme, "stored_as": "iob2"}, splits=splits_info,
            dropped={s: dict(c) for s, c in dropped.items()},
            conflicting_texts={s: len(c) for s, c in conflicts.items()}, **lengths))
    summary = "; ".join(f"{s} {i['rows']} sentences, entities {i['entity_counts']}" for s, i in splits_info.items())
    log.info("prepared %s (%s tags read as %s): %s; max_length %d", cfg.out, len(names), scheme, summary,
             lengths["max_length"])
    return cfg.out


def load_prepared(data_dir: Path) -> dict:
    """Reads a prepared data folder's manifest, checking it is one."""
    from jobs.artifacts import read_json

    data_dir = Path(data_dir).expanduser()
    if not (data_dir / "manifest.json").is_file() or not (data_dir / "train.parquet").is_file():
        raise InputError(f"{str(data_dir)!r} is not a prepared data folder (no manifest.json/train.parquet); "
                         "run `slimray prepare` first")
    return read_json(data_dir / "manifest.json")


def read_split(data: Path | str, split: str, columns: Sequence[str] = ("text", "label")) -> dict[str, list]:
    """One split of a prepared data folder (a path, or a storage URI that pyarrow reads) as column lists.

    Raises InputError naming the folder and the splits it has when ``split`` is missing.
    """
    from cluster import storage

    location = storage.join(data, f"{split}.parquet") if storage.is_uri(data) else Path(data) / f"{split}.parquet"
    if not storage.is_uri(location) and not Path(location).is_file():
        have = sorted(p.stem for p in Path(data).glob("*.parquet"))
        raise InputError(f"{str(data)!r} has no {split!r} split (it has {have}); re-run `slimray prepare`")
    table = pq.read_table(location, columns=list(columns))
    return {c: table.column(c).to_pylist() for c in columns}


def dry_run(cfg: PrepareConfig) -> str:
    """``--dry-run``: the output checked writable, the tokenizer found, every input file read and its text and
    label columns found (tag files parsed and their scheme detected), as ``main`` does before cleaning."""
    task = get_task(cfg.task)
    check_can_write(cfg.out, cfg.overwrite)
    load_tokenizer(cfg.tokenizer)
    if task.kind == "tagging":
        from jobs.tagging import detect_scheme, read_tagged

        files, _ = tagged_sources(cfg.source)
        read = {split: read_tagged(path) for split, path in files.items()}
        scheme = detect_scheme([s for rows in read.values() for s in rows]) if cfg.tag_scheme == "auto" \
            else cfg.tag_scheme
        found = ", ".join(f"{split} {len(rows)} sentences" for split, rows in read.items())
        return f"would prepare {task.name} data from {found} (tag scheme {scheme}) into {cfg.out}"
    tables, inputs = load_source(cfg.source, cfg.column_names)
    found = []
    for split, table in tables.items():
        where = next((i["path"] for i in inputs if i["split"] == split), cfg.source)
        texts, labels = extract(table, cfg, task, where)
        found.append(f"{split} {len(texts)} rows, {len(set(labels))} labels")
    return f"would prepare {task.name} data from {'; '.join(found)} into {cfg.out}"


def cli(argv: list[str] | None = None) -> None:
    run_cli(PrepareConfig, main, argv, prog="slimray prepare", check=dry_run)


if __name__ == "__main__":
    cli()
