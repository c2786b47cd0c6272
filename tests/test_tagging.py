import json

import pytest

from cluster.settings import get_settings
from jobs.errors import InputError
from jobs.tagging import (Sentence, detect_scheme, entity_counts, entity_metrics, normalize, read_tagged, spans,
                          tag_names)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_conll_reader_skips_docstart_and_takes_the_last_column(tmp_path):
    path = write(tmp_path, "a.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                 "German JJ B-NP B-MISC\n\n\t\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
    sentences = read_tagged(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert sentences[0].tags == ["B-ORG", "O", "B-MISC"] and sentences[1].lines == [8, 9]


def test_a_line_without_its_tag_column_is_an_error_naming_file_and_line(tmp_path):
    path = write(tmp_path, "a.conll", "Hello\tO\nworld\n")
    with pytest.raises(InputError, match=r"a\.conll:2: expected a token and a tag column .*'world'"):
        read_tagged(path)


def test_iob2_stray_inside_tag_is_an_error_or_repaired_and_counted(tmp_path):
    path = write(tmp_path, "a.conll", "in\tO\nNew\tI-location\nYork\tI-location\n\nvisit\tO\nParis\tB-location\n")
    sentences = read_tagged(path)
    with pytest.raises(InputError, match=r"a\.conll:2: I-location does not continue a location span"):
        normalize(sentences, "iob2")
    fixed = normalize(sentences, "iob2", repair=True)
    assert fixed.sentences[0].tags == ["O", "B-location", "I-location"] and fixed.repaired == 1
    assert detect_scheme(sentences) == "iob2"  # a B- after O: the file means IOB2, the stray I- is a mistake


def test_iob1_and_bioes_are_converted_to_iob2():
    iob1 = [Sentence(["a", "b", "c", "d"], ["I-PER", "I-PER", "B-PER", "O"], source="x")]
    assert detect_scheme(iob1) == "iob1"
    out = normalize(iob1)
    assert out.scheme == "iob1" and out.sentences[0].tags == ["B-PER", "I-PER", "B-PER", "O"] and out.converted == 1
    bioes = [Sentence(list("abcd"), ["S-LOC", "B-ORG", "E-ORG", "O"], source="x")]
    out = normalize(bioes)
    assert out.scheme == "bioes" and out.sentences[0].tags == ["B-LOC", "B-ORG", "I-ORG", "O"]
    with pytest.raises(InputError, match=r"x \(token 1\): tag 'S-LOC' is BIOES, but the tag scheme is iob2"):
        normalize(bioes, "iob2")
    with pytest.raises(InputError, match="tag 'PER' is neither O nor"):
        normalize([Sentence(["a"], ["PER"], source="x")])
    with pytest.raises(InputError, match="tag scheme 'bilou' is not one of"):
        normalize(bioes, "bilou")


def test_jsonl_keeps_an_empty_sentence_and_rejects_mismatched_lengths(tmp_path):
    path = write(tmp_path, "a.jsonl", json.dumps({"tokens": ["Hi", "Ann"], "tags": ["O", "B-person"]}) + "\n"
                 + json.dumps({"tokens": [], "tags": []}) + "\n")
    sentences = read_tagged(path)
    assert [len(s.tokens) for s in sentences] == [2, 0]
    bad = write(tmp_path, "b.jsonl", json.dumps({"tokens": ["Hi"], "tags": []}) + "\n")
    with pytest.raises(InputError, match=r"b\.jsonl:1: 1 tokens but 0 tags"):
        read_tagged(bad)
    with pytest.raises(InputError, match="file is empty"):
        read_tagged(write(tmp_path, "c.jsonl", "\n"))


def test_spans_counts_and_tag_names():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "B-LOC", "I-LOC"]
    assert spans(tags) == [(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "LOC"), (5, 7, "LOC")]
    sentences = [Sentence(list("abcdefg"), tags)]
    assert entity_counts(sentences) == {"LOC": 3, "PER": 1}
    assert tag_names(sentences) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_entity_metrics_default_mode_and_strict_mode_differ_on_a_stray_inside_tag():
    true = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["I-PER", "I-PER", "O", "O"]]  # default mode reads I-PER I-PER as the PER span; strict does not
    m = entity_metrics(true, pred)
    assert m["per_type"]["PER"]["f1"] == 1.0 and m["per_type"]["LOC"]["recall"] == 0.0
    assert m["entity_precision"] == 1.0 and m["entity_recall"] == 0.5
    assert m["entity_f1"] == pytest.approx(2 / 3)
    assert m["strict"]["entity_f1"] == 0.0 and m["macro_f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same sentences and lengths"):
        entity_metrics(true, [["O"]])


def test_wnut17_reads_and_normalizes_with_every_entity_counted():
    root = get_settings().data_root / "wnut17"
    if not (root / "train.conll").is_file():
        pytest.skip("WNUT-17 reference data not here")
    sentences = read_tagged(root / "train.conll")
    out = normalize(sentences)
    assert out.scheme == "iob2" and len(out.sentences) > 3000
    counts = entity_counts(out.sentences)
    assert set(counts) == {"corporation", "creative-work", "group", "location", "person", "product"}
    assert sum(counts.values()) == sum(t.startswith("B-") for s in out.sentences for t in s.tags)


def test_prepare_ner_from_the_wnut17_folder(tmp_path):
    import pyarrow.parquet as pq

    from jobs.prepare import PrepareConfig, main

    root = get_settings().data_root / "wnut17"
    if not (root / "train.conll").is_file():
        pytest.skip("WNUT-17 reference data not here")
    out = tmp_path / "data"
    main(PrepareConfig(source=str(root), task="ner", out=str(out)))
    info = json.loads((out / "manifest.json").read_text())
    assert info["task"] == "ner" and info["tag_scheme"] == {"read_as": "iob2", "stored_as": "iob2"}
    assert info["labels"][0] == "O" and len(info["labels"]) == 13
    assert info["splits"]["train"]["entity_counts"]["person"] > 600 and set(info["splits"]) == {"train", "validation",
                                                                                                "test"}
    test = pq.read_table(out / "test.parquet").to_pylist()
    assert all(r["text"] == " ".join(r["tokens"]) and len(r["tags"]) == len(r["tokens"]) == len(r["tag_ids"])
               for r in test)
    assert all(info["labels"][i] == t for r in test for i, t in zip(r["tag_ids"], r["tags"]))
    assert info["max_length"] >= 8 and "train_sentences_over_max_length" in info


def test_prepare_ner_repairs_or_rejects_and_cuts_missing_splits(tmp_path):
    from jobs.prepare import PrepareConfig, main

    lines = []
    for i in range(40):
        lines += ["see\tO", f"Ann{i}\tB-person", "in\tO", f"Town{i}\t{'I' if i == 3 else 'B'}-location", ""]
    src = write(tmp_path, "all.conll", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"all\.conll:19: I-location does not continue a location span"):
        main(PrepareConfig(source=str(src), task="ner", out=str(tmp_path / "a")))
    main(PrepareConfig(source=str(src), task="ner", out=str(tmp_path / "b"), repair_tags=True))
    info = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert info["splits"]["train"]["repaired_tags"] == 1
    assert sum(info["splits"][s]["rows"] for s in ("train", "validation", "test")) == 40
    assert sum(info["splits"][s]["entity_counts"]["location"] for s in ("train", "validation", "test")) == 40


def test_tagging_data_is_refused_by_the_stages_that_do_not_handle_it_yet():
    from jobs.tasks import sequence_task

    assert sequence_task("intent", "slimray finetune").kind == "sequence"
    with pytest.raises(InputError, match=r"prepared for task 'ner' \(tagging\); slimray finetune handles only intent"):
        sequence_task("ner", "slimray finetune")


def test_clean_sentences_splits_tokens_at_whitespace_and_drops_duplicates_and_conflicts():
    from jobs.tagging import clean_sentences

    rows = [Sentence(["New York", "rocks"], ["B-location", "O"]), Sentence(["New", "York", "rocks"],
                                                                           ["B-location", "I-location", "O"]),
            Sentence(["a", "b"], ["O", "O"]), Sentence(["a", "b"], ["B-person", "O"]), Sentence([" "], ["O"])]
    kept, dropped, conflicts = clean_sentences(rows)
    assert [s.tokens for s in kept] == [["New", "York", "rocks"]] and kept[0].tags == ["B-location", "I-location", "O"]
    assert dropped == {"token_split_at_whitespace": 1, "duplicate": 1, "conflicting_tags": 2, "blank_token": 1,
                       "empty_sentence": 1}
    assert list(conflicts) == ["a b"]


def test_windows_cover_every_word_once_and_label_only_first_pieces():
    import numpy as np

    from jobs.modeling import load_tokenizer
    from jobs.tagging import IGNORE, encode_windows, word_logits, word_windows

    tok = load_tokenizer("minilm")
    long = [f"word{i}" for i in range(50)] + ["Blackburnshire", "😀", "\u200b"]
    sentences = [long, [], ["Hello", "@user", "https://t.co/x"]]
    tags = [list(range(len(s))) for s in sentences]
    windows = word_windows(tok, sentences, 16)
    assert max(len(w.ids) for w in windows) <= 16 and len([w for w in windows if w.sentence == 0]) > 3
    covered = sorted((w.sentence, w.first_word + k) for w in windows for k in range(len(w.starts)))
    assert covered == [(s, k) for s in (0, 2) for k in range(len(sentences[s]))]  # every word once, in order
    batch = encode_windows(windows, tok.pad_token_id, tags)
    labelled = batch["labels"][batch["labels"] != IGNORE]
    assert sorted(labelled.tolist()) == sorted(t for s in tags for t in s)
    assert (batch["attention_mask"].sum(1) == [len(w.ids) for w in windows]).all()
    logits = np.zeros((*batch["input_ids"].shape, 60), dtype=np.float32)
    for r, w in enumerate(windows):  # a fake model that predicts each word's own index
        for k, pos in enumerate(w.starts):
            logits[r, pos, w.first_word + k] = 1.0
    words = word_logits(windows, logits, [len(s) for s in sentences])
    assert [w.argmax(-1).tolist() for w in words] == tags
    with pytest.raises(ValueError, match="leaves no room"):
        word_windows(tok, sentences, 2)


@pytest.mark.integration
def test_finetune_a_tagger_on_ray_train_with_windows_and_entity_metrics(finetuned_tagger, tagged_data, sample_data,
                                                                        tmp_path):
    from transformers import AutoConfig

    from jobs.evaluate import evaluate

    out = finetuned_tagger
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0 <= metrics["entity_f1"] <= 1
    assert set(metrics["per_type"]) == {"bank", "location", "person"} and "entity_f1" in metrics["strict"]
    assert metrics["entity_f1"] > 0.5, metrics  # templated entities: a tiny tagger learns them in a few epochs
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert any("val_entity_f1" in row for row in history)
    assert AutoConfig.from_pretrained(out).architectures == ["BertForTokenClassification"]
    # The single-process evaluation (windows of the recorded max_length, as served) scores what training did.
    evaluated, report = evaluate(out, tagged_data, "test")
    assert evaluated["entity_f1"] == pytest.approx(metrics["entity_f1"], abs=1e-6)
    assert "strict (IOB2) mode" in report and "person" in report
    with pytest.raises(InputError, match="is a tagger but .* is prepared for task 'intent'"):
        evaluate(out, sample_data, "test")
    # Batch tagging through Ray Data: every row kept (an empty text too), spans with exact offsets.
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from jobs.predict import PredictConfig
    from jobs.predict import main as predict

    texts = ["i met Ann Lee in Lisbon", " ", "is there a Monzo branch in Oslo?", "nothing here at all"]
    pacsv.write_csv(pa.table({"id": list(range(4)), "text": texts}), tmp_path / "in.csv")
    predict(PredictConfig(model=out, input=tmp_path / "in.csv", output=tmp_path / "out.parquet"))
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and rows[1]["entities"] == []
    found = [(e["type"], e["text"]) for r in rows for e in r["entities"]]
    assert all(r["text"][e["start"]:e["end"]] == e["text"] for r in rows for e in r["entities"])
    assert ("location", "Lisbon") in found or ("person", "Ann Lee") in found, found


def test_split_words_round_trips_stored_sentences_and_spans_have_exact_offsets():
    import numpy as np

    from jobs.tagging import char_spans, split_words

    text = 'Moving to  "New York," with @ann 😀 — café in Zürich.'
    words = split_words(text)
    assert all(text[s:e] == w for w, s, e in words) and [w for w, _, _ in words][:4] == ["Moving", "to", '"New',
                                                                                       'York,"']
    names = ["O", "B-location", "I-location", "B-person", "I-person"]
    ids = [0, 0, 1, 2, 0, 3, 0, 0, 0, 0, 1]
    probs = np.full((len(words), len(names)), 0.2)
    got = char_spans(text, words, ids, probs, names)
    assert [(e["type"], e["text"]) for e in got] == [("location", "New York"), ("person", "@ann"), ("location", "Zürich.")]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in got) and got[0]["score"] == pytest.approx(0.2)
    root = get_settings().data_root / "wnut17"
    if (root / "test.conll").is_file():
        sentences = read_tagged(root / "test.conll")
        assert all([w for w, _, _ in split_words(" ".join(s.tokens))] == s.tokens for s in sentences)
