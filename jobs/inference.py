"""Batched inference with a loaded classifier: shared by evaluate, predict and later stages."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def predict_logits(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int | None = None,
                   batch_size: int = 64) -> np.ndarray:
    """Logits, shape (len(texts), num_labels); texts padded to the longest in each batch."""
    import torch

    max_length = max_length or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            out.append(model(**batch).logits.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def model_max_length(model_dir: Any) -> int | None:
    """The max_length recorded by fine-tuning in the artifact's manifest, if any."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "manifest.json"
    if path.is_file():
        return json.loads(path.read_text()).get("max_length")
    return None
