"""The transfer set of the compression search: augmentations and unlabelled texts the teacher labels."""

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.errors import InputError
from jobs.prepare import read_split
from tuning.transfer import augment_text, build_transfer_set, read_unlabelled

REPO = Path(__file__).resolve().parent.parent


def splits(data: Path) -> tuple[list[str], list[str]]:
    train = read_split(data, "train")["text"]
    evaluation = read_split(data, "validation")["text"] + read_split(data, "test")["text"]
    return train, evaluation


def test_augmentation_is_deterministic_under_the_seed_and_never_holds_an_evaluation_text(sample_data):
    train, evaluation = splits(sample_data)
    # Evaluation texts offered as unlabelled input, and an evaluation text made by augmentation, are dropped.
    unlabelled = evaluation[:5] + ["where is my new card", "where is my new card"]
    a = build_transfer_set(train, evaluation, copies=2, seed=3, mask_token="[MASK]", unlabelled=unlabelled)
    b = build_transfer_set(train, evaluation, copies=2, seed=3, mask_token="[MASK]", unlabelled=unlabelled)
    c = build_transfer_set(train, evaluation, copies=2, seed=4, mask_token="[MASK]", unlabelled=unlabelled)
    assert a.texts == b.texts and a.dropped == b.dropped
    assert a.texts != c.texts
    blocked = {t.casefold() for t in evaluation + train}
    assert not [t for t in a.texts if t.casefold() in blocked]
    assert len(set(a.texts)) == len(a.texts)
    assert a.dropped["unlabelled_in_validation_or_test"] == 5
    assert a.dropped["unlabelled_duplicate"] == 1
    assert a.sources["unlabelled"] == 1 and a.texts[0] == "where is my new card"
    # Every train text is augmented `copies` times; only duplicates and collisions are dropped.
    assert a.sources["augmented"] + sum(v for k, v in a.dropped.items() if k.startswith("augmented")) == 2 * len(train)
    assert a.sources["augmented"] > 1.5 * len(train)


def test_an_augmentation_equal_to_an_evaluation_text_is_dropped_and_counted():
    train = ["my card has not arrived yet"]
    # Deleting "yet" (or any one word) from the only train text can give exactly this evaluation text.
    evaluation = ["my card has not arrived"]
    built = [build_transfer_set(train, evaluation, copies=20, seed=s, mask_token="[MASK]") for s in range(5)]
    assert all(evaluation[0] not in b.texts for b in built)
    assert sum(b.dropped["augmented_in_validation_or_test"] for b in built) > 0


@pytest.mark.parametrize("op", ["mask", "delete", "swap", "span_mix"])
def test_each_augmentation_changes_the_text_and_keeps_words(op):
    import numpy as np

    text, other = "please tell me why my transfer failed today", "how do I top up by card"
    out = augment_text(text, other, op, np.random.default_rng(0), "[MASK]")
    assert out != text and out.split()
    if op == "mask":
        assert "[MASK]" in out
    if op == "span_mix":
        assert set(out.split()) & set(other.split())


def test_unlabelled_files_are_read_and_bad_ones_fail_with_one_clear_line(tmp_path):
    txt = tmp_path / "logs.txt"
    txt.write_text("hello\n\n  two   spaces \n", encoding="utf-8")
    assert read_unlabelled(txt) == ["hello", "two spaces"]
    csv = tmp_path / "logs.csv"
    csv.write_text("id,message\n1,card blocked\n2,where is my refund\n", encoding="utf-8")
    assert read_unlabelled(csv) == ["card blocked", "where is my refund"]
    with pytest.raises(InputError, match=r"--unlabelled '.*missing.txt': no such file"):
        read_unlabelled(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no texts"):
        read_unlabelled(tmp_path / "empty.txt")
    (tmp_path / "two.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(InputError, match="no text column"):
        read_unlabelled(tmp_path / "two.csv")


@pytest.mark.parametrize("content", [None, ""])
def test_slimray_compress_with_a_missing_or_empty_unlabelled_file_fails_with_one_line(tiny_classifier, sample_data,
                                                                                     tmp_path, content):
    path = tmp_path / "unlabelled.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "slimray", "compress", "--model", str(tiny_classifier), "--data",
                           str(sample_data), "--out", str(tmp_path / "out"), "--unlabelled", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("slimray compress: error: --unlabelled")
    assert ("no such file" if content is None else "file is empty") in lines[0] or "holds no texts" in lines[0]
    assert not (tmp_path / "out" / "chosen").exists()
