import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.errors import InputError
from jobs.inference import build_torch_model, load_inference_model, softmax
from jobs.modeling import load_tokenizer
from jobs.prepare import read_split
from tuning.compress import (CompressConfig, NoCandidateError, SearchSpace, check_inputs, choose, default_points, main,
                              pareto_front, train_rows)
from tuning.methods import Candidate, Context, distill, prune, quantize, save_candidate, trim_vocab

REPO = Path(__file__).resolve().parent.parent


def context(data: Path, n: int = 300) -> Context:
    texts, y = train_rows(data, n)
    val = read_split(data, "validation", ("text", "label_id"))
    labels = json.loads((data / "labels.json").read_text())
    return Context(train_texts=texts, train_labels=y,
                   teacher_logits=np.zeros((len(y), len(labels)), dtype=np.float32),
                   val_texts=val["text"], val_labels=np.asarray(val["label_id"]), max_length=64, threads=2)


def candidate(path: Path) -> Candidate:
    return Candidate(build_torch_model(path, {}), load_tokenizer(path))


def logits(model, tokenizer, texts):
    with torch.inference_mode():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()


def test_trim_vocab_gives_identical_logits_on_kept_token_text(tiny_classifier, sample_data, tmp_path):
    ctx = context(sample_data)
    base = candidate(tiny_classifier)
    trimmed = trim_vocab(base, ctx)
    kept = trimmed.steps[-1]["kept_tokens"]
    assert kept < 5000 < len(base.tokenizer)  # a real trim: 30,522 -> a few thousand
    texts = ctx.train_texts[:40]  # made of kept tokens by construction
    np.testing.assert_allclose(logits(trimmed.model, trimmed.tokenizer, texts),
                               logits(base.model, base.tokenizer, texts), atol=1e-5)
    save_candidate(trimmed, tmp_path / "t", 64)
    loaded = load_inference_model(tmp_path / "t")
    np.testing.assert_allclose(loaded.logits(texts), logits(base.model, base.tokenizer, texts), atol=1e-4)
    assert trimmed.model.get_input_embeddings().weight.shape[0] == kept


# Words the sample's train texts never have: made up, digits, punctuation, accents, other scripts; "☺" and
# full-width letters are not in MiniLM's vocabulary at all, and a 101-character word is past its 100-character
# limit, so those are [UNK] with the full vocabulary too.
UNSEEN_TEXTS = ["zorblax quintessentially flummoxed", "wire 4096.75 eur to acct #88-1234!?", "¿dónde está ñandú",
                "naïve façade", "ελληνικά и русский текст", "東京 → ∞ ß øre", "☺ ｆｕｌｌ", "x" * 100, "y" * 101]


def test_trim_vocab_never_adds_an_unk(tiny_classifier, sample_data):
    ctx = context(sample_data)
    base = candidate(tiny_classifier)
    trimmed = trim_vocab(base, ctx)
    full, new = base.tokenizer, trimmed.tokenizer
    dropped = {p for t in UNSEEN_TEXTS for p in full.tokenize(t)} - set(new.get_vocab())
    assert len(dropped) > 20, dropped  # the texts need pieces trimming removed, so they must split otherwise
    for text in UNSEEN_TEXTS:
        want, got = full.tokenize(text), new.tokenize(text)
        assert want.count("[UNK]") == (text in ("☺ ｆｕｌｌ", "y" * 101)) * len(want), want
        assert got.count("[UNK]") == want.count("[UNK]"), (text, want, got)
        assert "".join(p.removeprefix("##") for p in got) == "".join(p.removeprefix("##") for p in want)
    step = trimmed.steps[-1]
    assert step["original_tokens"] == 30522 and step["single_char_pieces"] < step["kept_tokens"] < 5000, step
    assert len(new) == step["kept_tokens"]


def test_trim_vocab_keeps_a_byte_level_bpe_tokenizer_working(sample_data):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    ctx = context(sample_data)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(ctx.val_texts + ctx.train_texts, trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=16))
    trimmed = trim_vocab(Candidate(model.eval(), tok), ctx)
    assert trimmed.steps[-1]["single_char_pieces"] == 256 < trimmed.steps[-1]["kept_tokens"] < len(tok)
    texts = ctx.train_texts[:40]  # same pieces, renumbered, so the same logits
    assert [trimmed.tokenizer.tokenize(t) for t in texts] == [tok.tokenize(t) for t in texts]
    np.testing.assert_allclose(logits(trimmed.model, trimmed.tokenizer, texts), logits(model, tok, texts), atol=1e-5)
    for text in UNSEEN_TEXTS:  # byte-level: every byte is a kept piece, so any text still spells out exactly
        assert trimmed.tokenizer.decode(trimmed.tokenizer(text)["input_ids"]) == text


def test_prune_shrinks_weights_and_reloads_through_the_loader(tiny_classifier, sample_data, tmp_path):
    ctx = context(sample_data)
    pruned = prune(candidate(tiny_classifier), ctx, heads=0.5, ffn=0.5, importance="taylor")
    layer = pruned.model.base_model.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (192, 384)  # 12 heads x 32 -> 6 heads x 32
    assert layer.attention.output.dense.weight.shape == (384, 192)
    assert layer.intermediate.dense.weight.shape == (768, 384)  # 1536 -> 768 neurons
    encoder_params = lambda m: sum(p.numel() for p in m.base_model.encoder.parameters())  # noqa: E731
    assert encoder_params(pruned.model) < 0.55 * encoder_params(candidate(tiny_classifier).model)
    weights = save_candidate(pruned, tmp_path / "p", 64)
    assert weights.stat().st_size < (tiny_classifier / "model.safetensors").stat().st_size - 5_000_000
    loaded = load_inference_model(tmp_path / "p")
    texts = ctx.val_texts[:20]
    np.testing.assert_allclose(loaded.logits(texts), logits(pruned.model, pruned.tokenizer, texts), atol=1e-4)
    # Structured shapes are recorded, so a plain from_pretrained cannot silently load the wrong shapes.
    info = json.loads((tmp_path / "p" / "slimray_model.json").read_text())
    assert info["layer_shapes"] == [{"heads": 6, "ffn": 768}, {"heads": 6, "ffn": 768}]


def test_intermediate_layer_losses_fall_during_a_real_distillation(tiny_classifier, sample_data):
    ctx = context(sample_data, 256)
    teacher = candidate(tiny_classifier)
    ctx.teacher_logits = logits(teacher.model, teacher.tokenizer, ctx.train_texts)
    student = distill(teacher, ctx, layers=1, epochs=2, lr=3e-4, hidden_weight=1.0, attention_weight=1.0)
    step = student.steps[-1]
    assert (step["layers"], step["hidden_weight"], step["attention_weight"]) == ([1], 1.0, 1.0)
    first, last = step["losses"][0], step["losses"][-1]
    assert last["hidden"] < 0.95 * first["hidden"], step["losses"]
    assert last["attention"] < 0.95 * first["attention"], step["losses"]
    # The relations come from hooks on the q/k/v projections, gone afterwards; the attention implementation
    # (sdpa) is left as it was, so the saved student runs as fast as any other.
    for model in (student.model, teacher.model):
        attn = [layer.attention.self for layer in model.base_model.encoder.layer]
        assert not any(getattr(a, p)._forward_hooks for a in attn for p in ("query", "key", "value"))
    assert student.model.config._attn_implementation == teacher.model.config._attn_implementation


def test_distillation_learns_from_extra_rows_without_gold_labels(tiny_classifier, sample_data):
    ctx = context(sample_data, 0)  # no gold rows at all: only teacher-labelled extra texts
    teacher = candidate(tiny_classifier)
    classes = ctx.teacher_logits.shape[1]
    # Extra rows whose "teacher" says the class the real teacher predicts least often on validation.
    target = np.bincount(logits(teacher.model, teacher.tokenizer, ctx.val_texts).argmax(-1), minlength=classes).argmin()
    ctx.extra_texts = context(sample_data, 256).train_texts
    ctx.extra_logits = np.tile(10 * np.eye(classes, dtype=np.float32)[target], (256, 1))
    student = distill(teacher, ctx, layers=2, epochs=2, lr=1e-3, alpha=0.5)
    losses = student.steps[-1]["losses"]
    assert [e["steps"] for e in losses] == [256 // 32] * 2 and losses[-1]["ce"] == 0.0  # no gold label, no CE
    predicted = logits(student.model, student.tokenizer, ctx.val_texts).argmax(-1)
    assert (predicted == target).mean() > 0.9, np.bincount(predicted)
    ctx.extra_logits = ctx.extra_logits[:-1]
    with pytest.raises(ValueError, match=f"extra_logits \\(255, {classes}\\) for 256 extra texts"):
        distill(teacher, ctx, layers=1, epochs=1)


@pytest.mark.parametrize("backend", ["torch-int8", "onnx-int8", "onnx-int8-per-channel", "onnx-int8-unfused"])
def test_int8_backends_agree_with_fp32_on_argmax(tiny_classifier, sample_data, tmp_path, backend):
    ctx = context(sample_data)
    base = candidate(tiny_classifier)
    save_candidate(quantize(base, ctx, backend=backend), tmp_path / backend, 64)
    q = load_inference_model(tmp_path / backend, threads=1)
    assert q.backend == {"torch-int8": "torch-int8"}.get(backend, "onnx")
    texts = ctx.val_texts
    fp32 = logits(base.model, base.tokenizer, texts).argmax(-1)
    agree = (q.logits(texts).argmax(-1) == fp32).mean()
    assert agree >= 0.9, f"{backend} agrees with fp32 on {agree:.0%} of {len(texts)} texts"
    assert (fp32 == ctx.val_labels).mean() > 0.25  # 4x chance: a real classifier, so agreement means something


def onnx_argmax(path: Path, tokenizer, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(texts), 64):  # batches padded to their longest text, as the loader does
        enc = tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=64, return_tensors="np")
        out.append(session.run(["logits"], {x.name: enc[x.name].astype(np.int64) for x in session.get_inputs()})[0])
    return np.concatenate(out).argmax(-1)


def test_the_fused_onnx_graph_agrees_with_the_unfused_one(tiny_classifier, sample_data, tmp_path):
    from tuning.onnx_export import export_onnx, fuse

    ctx = context(sample_data)
    texts = {split: read_split(sample_data, split, ("text",))["text"] for split in ("train", "validation", "test")}
    unseen, every = texts["validation"] + texts["test"], texts["train"] + texts["validation"] + texts["test"]
    base = candidate(tiny_classifier)
    pruned = prune(base, ctx, heads=0.5, ffn=0.0, importance="magnitude")  # attention 6 x 32 wide, input 384
    for name, cand in (("base", base), ("pruned", pruned)):
        export_onnx(cand.model, cand.tokenizer, tmp_path / f"{name}-plain.onnx")
        export_onnx(cand.model, cand.tokenizer, tmp_path / f"{name}-eager.onnx", attention="eager")
        fused = fuse(tmp_path / f"{name}-eager.onnx", tmp_path / f"{name}-fused.onnx", cand.model)
        assert fused == {"Attention": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4, "BiasGelu": 2}
        agree = (onnx_argmax(tmp_path / f"{name}-fused.onnx", cand.tokenizer, unseen)
                 == onnx_argmax(tmp_path / f"{name}-plain.onnx", cand.tokenizer, unseen)).mean()
        assert agree >= 0.99, f"{name}: fp32 fused agrees with unfused on {agree:.1%} of {len(unseen)} texts"
    # The int8 artifacts, through the loader serving uses: each records its graph and quantization.
    # Quantization noise may flip a near tie of this small model (either graph: 1.1% of texts in one CI run),
    # not a decision the fp32 model makes with a clear margin.
    int8 = {}
    for backend in ("onnx-int8", "onnx-int8-unfused"):
        save_candidate(quantize(base, ctx, backend=backend), tmp_path / backend, 64)
        info = json.loads((tmp_path / backend / "slimray_model.json").read_text())
        assert info["quantization"] == "dynamic int8" and bool(info["fused"]) == (backend == "onnx-int8"), info
        int8[backend] = load_inference_model(tmp_path / backend, threads=1).logits(every).argmax(-1)
    probs = np.sort(softmax(load_inference_model(tiny_classifier, threads=1).logits(every)), axis=1)
    clear = probs[:, -1] - probs[:, -2] >= 0.1
    agree = (int8["onnx-int8"] == int8["onnx-int8-unfused"])
    assert clear.mean() >= 0.5, f"only {clear.mean():.1%} of texts have a clear fp32 decision"
    assert agree[clear].mean() >= 0.99, (f"int8 fused agrees with int8 unfused on {agree[clear].mean():.1%} of "
                                         f"{clear.sum()} clear decisions ({agree.mean():.1%} of all {len(every)})")


def test_latency_side_by_side_times_every_model_in_every_round(tiny_classifier, sample_data, tmp_path, monkeypatch):
    import tuning.measure as measure_module

    ctx = context(sample_data)
    save_candidate(quantize(candidate(tiny_classifier), ctx, backend="onnx-int8"), tmp_path / "int8", 64)
    visits = []
    real_pass = measure_module._pass_ms

    def counted(model, batches):
        visits.append((model, len(batches[0]["input_ids"])))
        return real_pass(model, batches)

    monkeypatch.setattr(measure_module, "_pass_ms", counted)
    texts = ctx.val_texts[:64]
    lat = measure_module.latency_side_by_side({"fp32": tiny_classifier, "int8": tmp_path / "int8"}, texts, rounds=3)
    assert set(lat) == {"fp32", "int8"}
    assert all(v["latency_ms_b1"] > 0 and v["latency_ms_b32"] > 0 for v in lat.values())
    models = [m for m, _ in visits]
    assert len(visits) == 3 * 2 * 2 and len(set(map(id, models))) == 2  # each model loaded once, timed every round
    assert [size for _, size in visits[:2]] == [1, 32]  # batch 1, then batch 32
    order = [models[i] for i in range(0, len(models), 2)]
    assert order[0] is order[3] and order[1] is order[2] and order[0] is not order[1]  # reversed in odd rounds


def row(tid, acc, f1, lat, size):
    return {"trial_id": tid, "val_accuracy": acc, "val_macro_f1": f1, "latency_ms_b1": lat, "size_mb": size}


def test_a_spent_time_budget_starts_no_trial_and_lets_the_running_ones_finish(monkeypatch):
    """Tune's own time_budget_s kills running trials; the search's budget only stops creating new ones, and a
    search restored before its budget ran out (its wrapper unpickled from tuner.pkl) counts it afresh."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.search import Searcher

    from tuning import compress

    class Counting(Searcher):
        def __init__(self):
            super().__init__(metric="val_accuracy", mode="max")
            self.suggested, self.completed = 0, []

        def suggest(self, trial_id):
            self.suggested += 1
            return {"x": self.suggested}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.completed.append(trial_id)

    now = [1000.0]
    monkeypatch.setattr(compress.time, "monotonic", lambda: now[0])
    search = compress.budgeted_search(Counting(), max_concurrent=2, budget_s=60)
    assert search.suggest("a") == {"x": 1} and search.suggest("b") == {"x": 2}
    assert search.suggest("c") is None  # two running: the third waits
    now[0] += 61
    assert search.suggest("c") == Searcher.FINISHED
    search.on_trial_complete("a", {"val_accuracy": 0.9})  # a trial running at the deadline reports as usual
    assert search.searcher.completed == ["a"] and search.suggest("d") == Searcher.FINISHED
    resumed = cloudpickle.loads(cloudpickle.dumps(search))
    assert resumed.suggest("d") == {"x": 3}
    restored = cloudpickle.loads(cloudpickle.dumps(search))  # Tune's restore: tuner.pkl, then the saved state
    now[0] += 1000
    restored.set_state(search.get_state())
    assert restored.suggest("e") == {"x": 3}  # the saved (spent) clock is not what counts in the new process
    assert compress.budgeted_search(Counting(), 1, None).suggest("a") == {"x": 1}  # no budget


def test_pareto_and_choice():
    rows = [row("a", 0.90, 0.88, 1.0, 10), row("b", 0.91, 0.90, 2.0, 20), row("c", 0.85, 0.80, 0.5, 5),
            row("d", 0.89, 0.87, 1.5, 12)]  # d is dominated by a
    assert {r["trial_id"] for r in pareto_front(rows)} == {"a", "b", "c"}
    base = {"val_accuracy": 0.91, "val_macro_f1": 0.90}
    assert choose(rows, base, 1.0)["trial_id"] == "a"  # c is faster but 6 points worse
    assert choose(rows, base, 10.0)["trial_id"] == "c"
    with pytest.raises(NoCandidateError, match=r"no candidate keeps validation accuracy >= 0.9100.*best candidates: a: val accuracy 0.9000"):
        choose(rows[:1] + rows[2:], {"val_accuracy": 0.91, "val_macro_f1": 0.99}, 0.0)


def test_clear_input_errors(tiny_encoder, tiny_classifier, sample_data, tmp_path):
    with pytest.raises(InputError, match="not a fine-tuned classifier"):
        check_inputs(CompressConfig(model=tiny_encoder, data=sample_data, out=tmp_path / "o"))
    no_val = tmp_path / "noval"
    no_val.mkdir()
    for f in ("train.parquet", "test.parquet", "manifest.json", "labels.json"):
        (no_val / f).write_bytes((sample_data / f).read_bytes())
    with pytest.raises(InputError, match="has no validation split"):
        check_inputs(CompressConfig(model=tiny_classifier, data=no_val, out=tmp_path / "o"))


FAST_SPACE = {"distill_epochs": [1], "recovery_steps": [0, 10], "prune_heads": [0.0, 0.5], "prune_ffn": [0.0, 0.5]}
POINT = {"distill_layers": 1, "distill_epochs": 1, "temperature": 2.0, "alpha": 0.5, "lr": 3e-4, "prune_heads": 0.0,
         "prune_ffn": 0.0, "importance": "taylor", "recovery_steps": 0, "trim_vocab": True, "quantize": "onnx-int8"}


@pytest.mark.integration
def test_a_killed_search_with_a_failing_trial_resumes_and_writes_the_choice(isolated_network, tiny_classifier,
                                                                            sample_data, tmp_path):
    """One search, three faults at once: its first trial raises (a 2-layer model has no 7 layers), its driver and
    the Ray cluster it started are SIGKILLed once a trial has finished, and the same search started again
    resumes (the finished trial is not rebuilt), survives the failed trial and writes its choice."""
    out = tmp_path / "compress"
    space = {**FAST_SPACE, "distill_layers": [0, 1, 7], "distill_epochs": [1, 3]}
    failing = {**POINT, "distill_layers": 7}
    fast = {**POINT, "distill_layers": 0, "trim_vocab": False}  # quantize only: done in seconds
    slow = {**POINT, "distill_epochs": 3}
    args = [sys.executable, "-m", "tuning.compress", "--model", str(tiny_classifier), "--data", str(sample_data),
            "--out", str(out), "--trials", "3", "--train-limit", "200", "--max-accuracy-drop", "100",
            "--trial-cpus", "2", "--set", "latency_rounds=3", "--set", f"search={json.dumps(space)}",
            "--set", f"initial_points={json.dumps([failing, fast, slow])}"]
    # Tune saves its experiment state every second here, so a finished trial is on disk when we kill.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:  # kill the whole process group once the state records a finished trial
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            states = list(out.glob("tune/experiment_state*.json"))
            if states and "TERMINATED" in states[0].read_text():
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the search's driver and the Ray cluster it started
        proc.wait()
    assert not (out / "chosen").exists(), f"the search finished before it could be killed ({list(out.glob('tune/*'))})"
    first = list(out.glob("search/*/slimray_model.json"))
    assert len(first) == 1, first
    stamp = first[0].stat().st_mtime
    main(CompressConfig(model=tiny_classifier, data=sample_data, out=out, trials=3, train_limit=200,
                        max_accuracy_drop=100, trial_cpus=2, latency_rounds=3, search=space))
    assert first[0].stat().st_mtime == stamp, "the finished trial was rebuilt instead of resumed"

    for f in ("chosen/metrics.json", "chosen/manifest.json", "chosen/slimray_model.json", "report.md", "pareto.png"):
        assert (out / f).stat().st_size > 0, f
    metrics = json.loads((out / "chosen" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "latency_ms_b1", "latency_ms_b32", "size_mb", "speedup_b1",
                "size_reduction", "accuracy_drop_pts"):
        assert isinstance(metrics[key], float), key
    assert set(metrics["base"]) >= {"accuracy", "macro_f1", "latency_ms_b1", "latency_ms_b32", "size_mb"}
    assert metrics["trials"] == {"finished": 2, "total": 3}
    report = (out / "report.md").read_text()
    assert "error" in report and "cannot keep 7 of 2 layers" in report and "**chosen**" in report
    assert load_inference_model(out / "chosen").labels == json.loads((sample_data / "labels.json").read_text())


def test_first_points_stay_inside_a_restricted_space():
    space = SearchSpace(distill_layers=[2, 3], prune_heads=[0.5], prune_ffn=[0.0, 0.5], recovery_steps=[200],
                        trim_vocab=[True], quantize=["torch-int8"])
    points = default_points(space, depth=6)
    for point in points:
        assert point["distill_layers"] in [2, 3] and point["prune_heads"] == 0.5 and point["recovery_steps"] == 200
        assert point["trim_vocab"] is True and point["quantize"] == "torch-int8"
    assert [p["prune_ffn"] for p in points] == [0.0, 0.0, 0.5, 0.0]  # the deepest student, then its FFN pruned
    alternative = default_points(SearchSpace(), depth=6)[0]
    assert (alternative["distill_layers"], alternative["prune_heads"], alternative["trim_vocab"],
            alternative["quantize"]) == (0, 0.0, False, "onnx-int8")
    points = default_points(SearchSpace(), depth=6)
    assert points[1] == {**alternative, "quantize": "onnx-int8-unfused"}  # both one-step baselines, measured
    assert [p["distill_layers"] for p in points[2:]] == [3, 3, 2]  # combinations, deepest student first
    for combination in points[2:]:
        assert combination["augment"] is True and combination["trim_vocab"] is True
        assert combination["hidden_weight"] == 0 and combination["attention_weight"] == 0
    assert [p["prune_ffn"] for p in points[2:]] == [0.0, 0.25, 0.0]  # the deepest again, its FFN cut by a quarter
    assert points[3]["recovery_steps"] == 200 and points[3]["prune_heads"] == 0.0


def measured(tid, acc, lat, size, pipeline, pareto=False):
    return {"trial_id": tid, "status": "finished", "config": {}, "artifact": tid, "pipeline": pipeline,
            "val_accuracy": acc, "val_macro_f1": acc - 0.01, "latency_ms_b1": lat, "latency_ms_b32": 10 * lat,
            "size_mb": size, "pareto": pareto}


REPORT_BASE = {"val_accuracy": 0.91, "val_macro_f1": 0.90, "latency_ms_b1": 6.0, "latency_ms_b32": 60.0, "size_mb": 90.0}
REPORT_TRIALS = [
    {"trial_id": "t4", "status": "stopped early (ASHA)", "config": {}, "val_accuracy": 0.5, "epoch": 1},
    measured("t1", 0.90, 2.0, 23.0, [{"method": "quantize", "backend": "onnx-int8"}], pareto=True),
    {"trial_id": "t5", "status": "error", "config": {}, "error": "ValueError: cannot keep 7 of 2 layers"},
    measured("t2", 0.905, 0.8, 5.0, [{"method": "trim_vocab", "original_tokens": 30522, "kept_tokens": 3000},
                                     {"method": "quantize", "backend": "torch-int8"}], pareto=True),
    measured("t3", 0.80, 3.0, 50.0, []),
]


def test_the_trial_table_orders_marks_and_explains_every_trial():
    from tuning.report import TRIAL_TABLE_HEADER, trial_table

    lines = trial_table(REPORT_TRIALS, REPORT_BASE, "t2")
    assert lines[:2] == TRIAL_TABLE_HEADER
    assert lines[2] == "| base | — | fine-tuned fp32 | 0.9100 | 0.9000 | 6.00 | 60.0 | 90.0 | |"
    # Finished by validation accuracy first, then the others, each with why it has no measurements.
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| t2", "| t1", "| t3", "| t4", "| t5"]
    assert lines[3] == ("| t2 | finished | trim vocab 30522->3000 -> torch-int8 | 0.9050 | 0.8950 | 0.80 | 8.0 | 5.0 "
                        "| **chosen** |")
    assert lines[4].endswith("| yes |") and lines[5].endswith("|  |")  # Pareto member, dominated
    assert lines[6] == "| t4 | stopped early (ASHA) | val accuracy 0.5000 after epoch 1 | | | | | | |"
    assert lines[7] == "| t5 | error | ValueError: cannot keep 7 of 2 layers | | | | | | |"
    assert all(line.count("|") == 10 for line in lines)  # every row has the header's 9 cells
    assert "**chosen**" not in "\n".join(trial_table(REPORT_TRIALS, REPORT_BASE, None))


def test_the_search_report_and_the_run_report_render_the_same_trial_table(tmp_path):
    from types import SimpleNamespace

    from slimray.report import RunArtifacts, compression_section
    from tuning.report import trial_table, write_report

    metrics = {"accuracy": 0.9, "macro_f1": 0.89, "latency_ms_b1": 0.81, "latency_ms_b32": 8.1, "size_mb": 5.0,
               "split": "test", "validation": {"accuracy": 0.905, "macro_f1": 0.895},
               "base": {"accuracy": 0.91, "macro_f1": 0.9, "latency_ms_b1": 6.0, "latency_ms_b32": 60.0,
                        "size_mb": 90.0}, "speedup_b1": 7.4, "speedup_b32": 7.4, "size_reduction": 18.0,
               "accuracy_drop_pts": 1.0, "latency_threads": 1, "trials": {"finished": 3, "total": 5}}
    cfg = SimpleNamespace(model="m", data="d", max_accuracy_drop=1.0, threads=1)
    write_report(tmp_path, REPORT_TRIALS, REPORT_BASE, REPORT_TRIALS[3], metrics, cfg)
    table = "\n".join(trial_table(REPORT_TRIALS, REPORT_BASE, "t2"))
    report = (tmp_path / "report.md").read_text()
    assert table in report and "## Chosen: `t2` — trim vocab 30522->3000 -> torch-int8" in report
    assert "| ratio | -1.00 pts | -1.00 pts | 7.40x faster | 7.40x faster | 18.00x smaller |" in report
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "trials.json").read_text())
    assert saved["chosen"]["trial_id"] == "t2" and saved["trials"] == REPORT_TRIALS
    # slimray run's report reads trials.json back and renders the very same table.
    art = RunArtifacts(run={}, data={}, ft_metrics={}, ft_manifest={}, history=[], trials=saved, chosen=metrics,
                       chosen_manifest={"trial_id": "t2", "method": REPORT_TRIALS[3]["pipeline"]},
                       compress_config={"max_accuracy_drop": 1.0}, smoke={})
    assert table in "\n".join(compression_section(art))
    assert art.alternative["trial_id"] == "t1"  # ONNX int8 alone, for the goals section

    write_report(tmp_path, REPORT_TRIALS, REPORT_BASE, None, None, cfg)  # no candidate met the constraint
    report = (tmp_path / "report.md").read_text()
    assert "## No candidate met the constraint" in report and "**chosen**" not in report
    assert "\n".join(trial_table(REPORT_TRIALS, REPORT_BASE, None)) in report


# ----------------------------------------------------------------------------------------------------------
# Entity taggers: the same methods with per-token KD, and the same search with entity F1.


def _tagger_context(data: Path, teacher: Candidate, max_length: int = 16) -> Context:
    """The train / validation sentences of ``data`` with the teacher's per-word logits (max length 16, so that
    long sentences are windowed)."""
    from tuning.methods import predict_words

    texts, tags = train_rows(data, None, "tagging")
    val = read_split(data, "validation", ("tokens", "tag_ids"))
    words = predict_words(teacher.model, teacher.tokenizer, texts, max_length)
    return Context(train_texts=texts, train_labels=tags, teacher_logits=np.concatenate(words), kind="tagging",
                   val_texts=[list(s) for s in val["tokens"]], val_labels=[list(t) for t in val["tag_ids"]],
                   max_length=max_length, threads=2, batch_size=16)


def test_a_tagger_distils_per_token_prunes_trims_and_exports(tiny_encoder, tagged_data, tmp_path):
    """Per-token KD (with the hidden-state term) lowers its losses epoch over epoch; the student, pruned,
    trimmed and exported to ONNX int8, loads as a tagger whose word tags mostly agree with its fp32 self, and
    trimming tags the train sentences exactly as before."""
    from jobs.modeling import load_pretrained_for_training
    from jobs.tagging import word_windows
    from tuning.measure import measure
    from tuning.methods import kd_train, predict_words, score

    labels = json.loads((tagged_data / "labels.json").read_text())
    teacher = Candidate(load_pretrained_for_training(str(tiny_encoder), labels, "AutoModelForTokenClassification"),
                        load_tokenizer(tiny_encoder))
    ctx = _tagger_context(tagged_data, teacher)
    kd_train(teacher.model, teacher.tokenizer, ctx, epochs=3, lr=1e-3, temperature=1.0, alpha=0.0)  # gold CE only
    assert score(teacher.model, teacher.tokenizer, ctx.val_texts, ctx.val_labels, 16, "tagging") > 0.5
    ctx = _tagger_context(tagged_data, teacher)  # logits of the trained teacher
    assert any(len(w.starts) < len(s) for w in word_windows(teacher.tokenizer, ctx.train_texts, 16)
               for s in [ctx.train_texts[w.sentence]])  # some sentences are cut into windows

    student = distill(teacher, ctx, layers=1, epochs=2, lr=1e-3, temperature=2.0, alpha=0.9, hidden_weight=1.0)
    losses = student.steps[-1]["losses"]
    assert losses[-1]["kd"] < losses[0]["kd"] and losses[-1]["hidden"] < losses[0]["hidden"], losses
    pruned = prune(student, ctx, heads=0.5, ffn=0.5, recovery_steps=5)
    trimmed = trim_vocab(pruned, ctx)
    assert trimmed.steps[-1]["kept_tokens"] < trimmed.steps[-1]["original_tokens"]
    before = np.concatenate(predict_words(pruned.model, pruned.tokenizer, ctx.train_texts[:50], 16))
    after = np.concatenate(predict_words(trimmed.model, trimmed.tokenizer, ctx.train_texts[:50], 16))
    np.testing.assert_allclose(after, before, atol=1e-4)  # train words keep their pieces, renumbered

    save_candidate(quantize(trimmed, ctx, backend="onnx-int8"), tmp_path / "onnx", 16)
    exported = load_inference_model(tmp_path / "onnx")
    assert exported.kind == "tagging" and exported.backend == "onnx"
    fp32 = np.concatenate([w.argmax(-1) for w in predict_words(trimmed.model, trimmed.tokenizer, ctx.val_texts, 16)])
    int8 = np.concatenate([w.argmax(-1) for w in exported.tag(ctx.val_texts)])
    assert fp32.shape == int8.shape and (fp32 == int8).mean() >= 0.95
    val = read_split(tagged_data, "validation", ("tokens", "tags"))
    texts = read_split(tagged_data, "train", ("text",))["text"][:32]  # words joined by spaces
    m = measure(tmp_path / "onnx", texts, eval_sets={"val": (val["tokens"], val["tags"])}, repeats=1)
    assert m["metric"] == "entity_f1" and 0 <= m["val_accuracy"] <= 1 and m["latency_ms_b32"] > 0


def test_compress_refuses_unlabelled_text_for_a_tagger_and_a_mismatched_model(tiny_encoder, tagged_data, sample_data,
                                                                             tmp_path):
    from jobs.modeling import load_pretrained_for_training

    labels = json.loads((tagged_data / "labels.json").read_text())
    model = load_pretrained_for_training(str(tiny_encoder), labels, "AutoModelForTokenClassification")
    model.save_pretrained(tmp_path / "tagger")
    load_tokenizer(tiny_encoder).save_pretrained(tmp_path / "tagger")
    (tmp_path / "u.txt").write_text("some text\n")
    with pytest.raises(InputError, match="unlabelled text distils only intent and sentiment"):
        check_inputs(CompressConfig(model=tmp_path / "tagger", data=tagged_data, out=tmp_path / "o",
                                    unlabelled=tmp_path / "u.txt"))
    with pytest.raises(InputError, match="is an entity tagger but .* prepared for task 'intent'"):
        check_inputs(CompressConfig(model=tmp_path / "tagger", data=sample_data, out=tmp_path / "o"))


def test_a_taggers_first_distillations_keep_the_whole_vocabulary():
    classifier = default_points(SearchSpace(), depth=6)
    tagger = default_points(SearchSpace(), depth=6, tagger=True)
    assert [p["distill_layers"] for p in tagger] == [p["distill_layers"] for p in classifier] == [0, 0, 3, 3, 2]
    assert [p["trim_vocab"] for p in classifier] == [False, False, True, True, True]
    assert [p["trim_vocab"] for p in tagger] == [False] * 5
    assert [p["trim_vocab"] for p in default_points(SearchSpace(trim_vocab=[True]), 6, tagger=True)] == [True] * 5
