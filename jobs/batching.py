"""Length-grouped batches: rows of similar token length share a batch, so padding costs little.

A batch is padded to its longest row, and on CPU a forward or backward pass costs about what its padded
tokens cost. Short texts of mixed length (chat messages, intents) waste most of a random batch on padding.
``length_grouped_batches`` is the megabatch scheme of Hugging Face's ``LengthGroupedSampler``: shuffle,
cut into megabatches of ``megabatch`` batches, sort each by length, cut into batches, shuffle the batches.
Every row is used once per epoch and batches stay random across the epoch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def token_lengths(tokenizer: Any, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Tokens per text (special tokens included, truncated at ``max_length``), as the model sees them."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                           megabatch: int = 50) -> list[np.ndarray]:
    """One epoch's batches of row indices (the last one may be short), grouped by length within megabatches
    of ``megabatch * batch_size`` shuffled rows; ``megabatch=1`` is a plain shuffle."""
    if batch_size < 1 or megabatch < 1:
        raise ValueError(f"batch_size and megabatch must be >= 1, got {batch_size} and {megabatch}")
    order = rng.permutation(len(lengths))
    span = batch_size * megabatch
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padded_tokens(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> int:
    """Tokens the batches cost once each is padded to its longest row."""
    return int(sum(len(b) * lengths[b].max() for b in batches if len(b)))


def length_buckets(lengths: Sequence[int], max_ratio: float = 1.25) -> list[np.ndarray]:
    """Indices of ``lengths`` cut into groups of similar length: sorted by length, a group ends where the next
    row is more than ``max_ratio`` times as long as the group's shortest. Padding a group to its longest then
    costs at most ``max_ratio`` times its tokens (a batch of single chat messages otherwise pays several
    times: in random batches of 32 BANKING77 texts paid 2.80x)."""
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or lengths[order[i]] > max_ratio * lengths[order[start]]:
            groups.append(order[start:i])
            start = i
    return groups
