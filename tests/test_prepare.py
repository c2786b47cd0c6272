import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.errors import InputError
from jobs.prepare import PrepareConfig, main, normalize_text, stratified_split

import numpy as np


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_rows(n_per_label=20, labels=("a", "b", "c")):
    return [(f"message number {i} about {lab}", lab) for lab in labels for i in range(n_per_label)]


def prepare(tmp_path, source, **kw):
    cfg = PrepareConfig(source=str(source), out=tmp_path / "out", **kw)
    main(cfg)
    out = tmp_path / "out"
    return out, json.loads((out / "manifest.json").read_text())


def test_normalize_text():
    assert normalize_text("  Cafe\u0301 \n  is\topen ") == "Café is open"


def test_cleaning_dedup_conflicts_and_leakage(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    train = make_rows() + [
        ("message number 0 about a", "a"),           # exact duplicate
        ("message   number 1 about a", "a"),         # duplicate after whitespace collapse
        ("   ", "a"),                                # empty
        ("ambiguous text", "a"), ("ambiguous text", "b"),  # conflicting labels
        ('quoted, with a\nline break "inside"', "c"),
    ]
    write_csv(src / "train.csv", train)
    write_csv(src / "test.csv", [("message number 3 about b", "b"), ("brand new test text", "c")])
    out, m = prepare(tmp_path, src)
    assert m["dropped"]["train"] == {"empty_text": 1, "duplicate": 2, "conflicting_label": 2}
    assert m["dropped"]["test"]["leaked_from_train_or_validation"] == 1
    assert m["conflicting_texts"]["train"] == 1
    assert json.loads((out / "conflicts.jsonl").read_text().splitlines()[0])["labels"] == ["a", "b"]
    assert json.loads((out / "labels.json").read_text()) == ["a", "b", "c"]
    texts = pq.read_table(out / "train.parquet").column("text").to_pylist() + \
        pq.read_table(out / "validation.parquet").column("text").to_pylist()
    assert 'quoted, with a line break "inside"' in texts
    test = pq.read_table(out / "test.parquet").to_pylist()
    assert test == [{"text": "brand new test text", "label": "c", "label_id": 2}]
    assert m["splits"]["validation"]["rows"] == 6  # 10% of 20 per label, stratified
    assert set(m["splits"]["validation"]["label_counts"]) == {"a", "b", "c"}
    assert len(m["inputs"]) == 2 and all(len(i["sha256"]) == 64 for i in m["inputs"])
    assert 8 <= m["max_length"] <= 512 and m["max_length"] % 8 == 0


def test_split_is_deterministic_and_stratified():
    labels = ["x"] * 50 + ["y"] * 10 + ["z"]
    a = stratified_split(labels, 0.2, np.random.default_rng(1))
    b = stratified_split(labels, 0.2, np.random.default_rng(1))
    assert a == b
    cut = [labels[i] for i in a[1]]
    assert cut.count("x") == 10 and cut.count("y") == 2 and "z" not in cut


def test_single_file_gets_validation_and_test_cut(tmp_path):
    out, m = prepare(tmp_path, write_csv(tmp_path / "all.csv", make_rows(30)))
    assert {s: i["rows"] for s, i in m["splits"].items()} == {"train": 72, "validation": 9, "test": 9}


def test_limit_keeps_every_label(tmp_path):
    out, m = prepare(tmp_path, write_csv(tmp_path / "all.csv", make_rows(30, labels="abcdef")), limit=12)
    assert m["splits"]["train"]["rows"] == 12
    assert set(m["splits"]["train"]["label_counts"]) == set("abcdef")


def test_jsonl_and_parquet_sources(tmp_path):
    rows = make_rows(10)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"utterance": t, "intent": l}) + "\n" for t, l in rows))
    _, m = prepare(tmp_path, tmp_path / "d.jsonl")
    assert m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"] + m["splits"]["test"]["rows"] == 30


def test_sentiment_ratings_are_bucketed(tmp_path):
    p = tmp_path / "news.tsv"
    lines = [f"{i}\t{r}\tsentence {i} with \"quotes" for i, r in enumerate([-3.5, -2.0, 0.1, -0.2, 2.5, 3.0] * 10)]
    p.write_text("\r\n".join(lines) + "\r\n")
    _, m = prepare(tmp_path, p, task="sentiment", column_names=["id", "rating", "text"])
    counts = {}
    for s in m["splits"].values():
        for k, v in s["label_counts"].items():
            counts[k] = counts.get(k, 0) + v
    assert counts == {"negative": 20, "neutral": 20, "positive": 20}


@pytest.mark.parametrize("case,message", [
    ("missing_text", r"no text column 'body'.*columns are \['text', 'label'\]"),
    ("missing_label", r"cannot tell which column holds the label"),
    ("empty", r"file is empty"),
    ("header_only", r"header but no rows"),
    ("not_utf8", r"line 3 holds bytes that are not UTF-8"),
    ("unseen_test_label", r"test split has labels never seen in train: \{'zzz': 1\}"),
])
def test_bad_input_is_named_and_leaves_no_output(tmp_path, case, message):
    src = tmp_path / "src"
    src.mkdir()
    kw = {}
    if case == "missing_text":
        write_csv(src / "train.csv", make_rows())
        kw["text_column"] = "body"
    elif case == "missing_label":
        write_csv(src / "train.csv", make_rows(), header=("text", "whatever"))
    elif case == "empty":
        (src / "train.csv").write_text("")
    elif case == "header_only":
        (src / "train.csv").write_text("text,label\n")
    elif case == "not_utf8":
        (src / "train.csv").write_bytes(b"text,label\nfine,a\ncaf\xe9 latin-1,b\n")
    elif case == "unseen_test_label":
        write_csv(src / "train.csv", make_rows())
        write_csv(src / "test.csv", [("something else", "zzz")])
    with pytest.raises(InputError, match=message):
        prepare(tmp_path, src, **kw)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no staging folder left behind"


def test_existing_output_needs_overwrite(tmp_path):
    src = write_csv(tmp_path / "all.csv", make_rows())
    prepare(tmp_path, src)
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        prepare(tmp_path, src)
    prepare(tmp_path, src, overwrite=True)


def test_source_that_does_not_exist(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare(tmp_path, tmp_path / "nope.csv")


def test_banking77(tmp_path, data_root):
    out, m = prepare(tmp_path, data_root / "banking77")
    assert len(m["labels"]) == 77
    assert m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"] + m["dropped"]["train"]["duplicate"] == 10003
    assert m["splits"]["test"]["rows"] > 3000
    assert min(m["splits"]["validation"]["label_counts"].values()) >= 1
