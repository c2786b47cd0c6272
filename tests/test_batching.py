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
