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
