import numpy as np
import pytest

from jobs.batching import length_grouped_batches, padded_tokens


def test_length_grouped_batches_use_every_row_once_and_cut_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 60, size=1003)
    grouped = length_grouped_batches(lengths, 32, np.random.default_rng(0))
    plain = length_grouped_batches(lengths, 32, np.random.default_rng(0), megabatch=1)
    for batches in (grouped, plain):
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(1003))
        assert sorted(len(b) for b in batches)[1:] == [32] * (len(batches) - 1)  # one short batch at most
    assert padded_tokens(lengths, grouped) < 0.6 * padded_tokens(lengths, plain)
    again = length_grouped_batches(lengths, 32, np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip(grouped, again))  # deterministic under the seed
    assert padded_tokens(lengths, grouped) >= lengths.sum()


def test_length_grouped_batches_reject_a_bad_size():
    with pytest.raises(ValueError, match="batch_size and megabatch must be >= 1, got 0"):
        length_grouped_batches(np.ones(4, int), 0, np.random.default_rng(0))


def test_length_buckets_bound_the_padding_and_keep_every_row():
    from jobs.batching import length_buckets

    lengths = np.array([5, 40, 6, 12, 13, 41, 5, 7])
    groups = length_buckets(lengths, max_ratio=1.25)
    assert sorted(np.concatenate(groups).tolist()) == list(range(8))
    assert all(lengths[g].max() <= 1.25 * lengths[g].min() for g in groups)
    assert [sorted(lengths[g].tolist()) for g in groups] == [[5, 5, 6], [7], [12, 13], [40, 41]]
    assert [g.tolist() for g in length_buckets(lengths, max_ratio=100)] == [np.argsort(lengths, kind="stable").tolist()]
    with pytest.raises(ValueError, match="max_ratio must be >= 1"):
        length_buckets(lengths, 0.5)


def test_logits_by_length_equal_the_plain_ones_in_the_callers_order(tiny_classifier, sample_data):
    from jobs.inference import load_inference_model
    from jobs.prepare import read_split

    texts = read_split(sample_data, "test", ("text",))["text"][:100]
    texts = texts + ["a much longer message " * 6 + t for t in texts[:10]]  # mixed lengths
    model = load_inference_model(tiny_classifier, threads=1)
    plain, grouped = model.logits(texts, batch_size=16), model.logits(texts, batch_size=16, by_length=True)
    assert grouped.shape == plain.shape and np.allclose(grouped, plain, atol=1e-4)
    assert (grouped.argmax(-1) == plain.argmax(-1)).all()


def test_the_traced_forward_agrees_with_the_eager_model_on_every_text(tiny_classifier, sample_data, tmp_path):
    from jobs.inference import load_inference_model
    from jobs.prepare import read_split

    texts = read_split(sample_data, "test", ("text",))["text"][:60]
    texts = texts + ["a much longer message " * 6 + t for t in texts[:6]] + ["?"]
    traced, eager = load_inference_model(tiny_classifier, threads=1), load_inference_model(tiny_classifier, threads=1,
                                                                                            script=False)
    assert getattr(traced.forward, "traced", False) and not getattr(eager.forward, "traced", False)
    for batch_size in (1, 7, 32):  # batch 1 has no padding; the others pad to their longest text
        a, b = traced.logits(texts, batch_size=batch_size), eager.logits(texts, batch_size=batch_size)
        assert np.allclose(a, b, atol=1e-4) and (a.argmax(-1) == b.argmax(-1)).all()


def test_a_model_that_does_not_trace_runs_eagerly_with_a_warning(tiny_classifier, caplog):
    import torch

    from jobs.inference import build_torch_model, traced_forward
    from jobs.modeling import load_tokenizer

    model = build_torch_model(tiny_classifier, {})
    inner = model.forward

    def shape_dependent(*args, **kwargs):  # Python control flow on a shape: the trace keeps one branch
        out = inner(*args, **kwargs)
        if kwargs["input_ids"].shape[0] == 1:
            out.logits = out.logits + 1
        return out

    model.forward = shape_dependent
    with caplog.at_level("WARNING", logger="slimray.inference"):
        forward = traced_forward(model, load_tokenizer(tiny_classifier))
    assert not getattr(forward, "traced", False)
    assert "TorchScript trace of" in caplog.text and "running it eagerly" in caplog.text
    batch = {"input_ids": np.array([[101, 2054, 102]]), "attention_mask": np.ones((1, 3), dtype=np.int64)}
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    assert np.allclose(forward(batch), want)
