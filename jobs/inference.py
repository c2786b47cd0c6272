"""Inference on any slimray model artifact: one loader shared by evaluate, predict, compression and serving.

``load_inference_model(path)`` returns an ``InferenceModel``: label names, the max length recorded at
fine-tuning, and ``logits(texts)``. Backends are plain functions in ``BACKENDS`` keyed by the ``backend``
field of the artifact's ``slimray_model.json``; a folder without that file is a Hugging Face PyTorch model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jobs.errors import InputError
from jobs.modeling import MODEL_INFO, check_model_folder, load_tokenizer, load_weights_error


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def model_max_length(model_dir: Any) -> int | None:
    """The max_length recorded by fine-tuning in the artifact's manifest, if any."""
    path = Path(model_dir) / "manifest.json"
    if path.is_file():
        return json.loads(path.read_text()).get("max_length")
    return None


@dataclass
class InferenceModel:
    """A loaded artifact. ``forward(encoded batch) -> logits`` runs the model on tokenized input."""

    path: Path
    backend: str
    labels: list[str]
    max_length: int
    tokenizer: Any
    forward: Callable[[dict[str, np.ndarray]], np.ndarray]
    kind: str = "sequence"  # "tagging": a token-classification model (``tag``, not ``logits``)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="np"))

    def logits(self, texts: Sequence[str], batch_size: int = 64, by_length: bool = False) -> np.ndarray:
        """(texts, labels) logits of a sequence classifier, in batches of ``batch_size`` texts padded to their
        longest. ``by_length`` first groups texts of similar token length (``jobs.batching.length_buckets``)
        so that padding costs little; the rows come back in the order of ``texts`` either way."""
        if self.kind != "sequence":
            raise InputError(f"{self.path} is an entity tagger: it tags words (tag), it does not label texts")
        if by_length and len(texts) > 1:
            from jobs.batching import length_buckets, token_lengths

            out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
            for group in length_buckets(token_lengths(self.tokenizer, texts, self.max_length)):
                for i in range(0, len(group), batch_size):
                    rows = group[i:i + batch_size]
                    out[rows] = self.forward(self.encode([texts[j] for j in rows]))
            return out
        out = [self.forward(self.encode(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def tag(self, sentences: Sequence[Sequence[str]], batch_size: int = 64) -> list[np.ndarray]:
        """Per sentence (a list of words), the (words, tags) logits at each word's first piece; a sentence
        longer than ``max_length`` is tagged window by window (``jobs.tagging.word_windows``)."""
        from jobs.tagging import tag_sentences

        if self.kind != "tagging":
            raise InputError(f"{self.path} labels whole texts (logits); it is not an entity tagger")
        return tag_sentences(self.forward, self.tokenizer, sentences, self.max_length, len(self.labels),
                             batch_size)

    def entities(self, texts: Sequence[str], batch_size: int = 64) -> list[list[dict[str, Any]]]:
        """Per raw text, its entities ``{"start", "end", "type", "text", "score"}`` with character offsets: the
        text split into words as prepared data stores them (``jobs.tagging.split_words``), tagged, and the
        tags turned back into spans (``jobs.tagging.char_spans``). Predict and serving both answer with this."""
        from jobs.tagging import char_spans, split_words

        words = [split_words(t) for t in texts]
        logits = self.tag([[w for w, _, _ in row] for row in words], batch_size=batch_size)
        out = []
        for text, row, lg in zip(texts, words, logits):
            probs = softmax(lg)  # (words, tags); no rows for an empty text
            out.append(char_spans(text, row, probs.argmax(-1), probs, self.labels))
        return out


def torch_forward(model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """``forward`` of a PyTorch model: numpy inputs in, fp32 numpy logits out, without autograd."""
    import torch

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()

    return forward


def traced_forward(model: Any, tokenizer: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """``forward`` of a frozen TorchScript trace of ``model`` (an eval-mode classifier or tagger), checked
    against the eager model at load; the eager ``torch_forward`` when tracing fails or disagrees.

    MiniLM-L6, 1 thread, batch 1: eager 9.5 ms alone and 19.9 ms beside a busy thread, traced 6.3 and
    6.9 ms (on the 2026-12-06 machine; 23.3 against 15.9 ms alone in bench/serve.py on the 2026-12-07 one), because the trace runs without Python between the ops; a serving replica shares
    its cores with the proxy and the ingress, which is the second case. The trace is taken on a padded batch
    of two texts, so that the attention mask stays in the graph (transformers drops it when a batch has no
    padding), and it is compared with the eager logits on batches of other sizes and lengths. Calls whose
    inputs are not the traced ones (other keys) run eagerly. TorchScript is in maintenance in PyTorch, and
    ``torch.compile`` needs a compiler and recompiles per shape; tracing is the fast path that loads in ~2 s.
    """
    import logging
    import warnings

    import torch

    eager = torch_forward(model)
    log = logging.getLogger("slimray.inference")

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in enc.items()}

    example = encode(["a", "a longer text, padded against the first one"])
    keys = tuple(example)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values in transformers' code
            traced = torch.jit.trace(model, example_kwarg_inputs=example, strict=False)
            traced = torch.jit.freeze(traced)  # optimize_for_inference measured no faster at batch 1 or 32
            for texts in (["one"], ["two texts", "of quite different lengths, to check the mask"],
                          ["three", "short texts", "here"]):
                batch = encode(texts)
                got, want = traced(**batch)["logits"], model(**batch).logits
                if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3):
                    raise ValueError(f"the trace disagrees with the eager model on {texts!r}")
    except Exception as e:  # a model whose forward does not trace: correct and slower beats fast and wrong
        log.warning("TorchScript trace of %s failed (%s); running it eagerly", type(model).__name__, e)
        return eager

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        if any(k not in batch for k in keys):
            return eager(batch)
        with torch.inference_mode():
            out = traced(**{k: torch.from_numpy(np.asarray(batch[k], dtype=np.int64)) for k in keys})
        return out["logits"].float().numpy()

    forward.traced = True  # type: ignore[attr-defined]
    return forward


def build_torch_model(path: Path, info: dict[str, Any], load_weights: bool = True,
                      checked: bool = False) -> Any:
    """The fp32 PyTorch model of an artifact: a plain HF folder, or one with pruned per-layer shapes.

    ``load_weights=False`` builds the skeleton only (for int8 artifacts, whose weights load after quantizing);
    ``checked``: the caller already ran ``check_model_folder`` (``load_inference_model`` does).
    """
    if load_weights and not info.get("layer_shapes"):
        from jobs.modeling import load_classifier

        return load_classifier(path, checked=checked)[0]
    import transformers
    from safetensors.torch import load_file

    from jobs.modeling import apply_layer_shapes, head_class

    config = transformers.AutoConfig.from_pretrained(path)
    model = head_class(config).from_config(config)
    if info.get("layer_shapes"):
        apply_layer_shapes(model, info["layer_shapes"])
    if load_weights:
        weights = path / "model.safetensors"
        try:
            model.load_state_dict(load_file(weights), strict=True)
        except Exception as e:  # SafetensorError (damaged), RuntimeError (shapes)
            raise load_weights_error(weights, e) from None
    return model.eval()


def model_forward(model: Any, tokenizer: Any, info: dict[str, Any]) -> Callable:
    """The traced forward, unless the loader was asked for the eager one (``script=False``)."""
    return traced_forward(model, tokenizer) if info.get("script", True) else torch_forward(model)


def load_torch(path: Path, info: dict[str, Any]) -> tuple[Any, Callable]:
    tokenizer = load_tokenizer(path)
    return tokenizer, model_forward(build_torch_model(path, info, checked=True), tokenizer, info)


def quantize_dynamic_int8(model: Any) -> Any:
    """PyTorch dynamic int8 on every nn.Linear (weights int8, activations quantized per batch)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, still the fastest here
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_torch_int8(path: Path, info: dict[str, Any]) -> tuple[Any, Callable]:
    """Rebuilds the fp32 skeleton (with pruned shapes), quantizes it, then loads the saved int8 state."""
    import torch

    weights = path / info.get("weights", "model_int8.pt")
    model = quantize_dynamic_int8(build_torch_model(path, info, load_weights=False))
    try:  # weights_only: tensors and plain containers, never arbitrary pickled objects
        model.load_state_dict(torch.load(weights, weights_only=True))
    except Exception as e:
        raise load_weights_error(weights, e) from None
    tokenizer = load_tokenizer(path)
    return tokenizer, model_forward(model.eval(), tokenizer, info)


def load_onnx(path: Path, info: dict[str, Any]) -> tuple[Any, Callable]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = info.get("threads") or 0  # 0: onnxruntime's default (all cores)
    options.inter_op_num_threads = 1
    weights = path / info.get("weights", "model.onnx")
    try:
        session = ort.InferenceSession(str(weights), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's InvalidProtobuf / Fail / NoSuchFile
        raise load_weights_error(weights, e) from None
    names = [i.name for i in session.get_inputs()]

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["logits"], {k: batch[k].astype(np.int64) for k in names})[0]

    return load_tokenizer(path), forward


BACKENDS: dict[str, Callable[[Path, dict[str, Any]], tuple[Any, Callable]]] = {
    "torch": load_torch,
    "torch-int8": load_torch_int8,
    "onnx": load_onnx,
}


def load_inference_model(path: str | Path, threads: int | None = None, script: bool = True) -> InferenceModel:
    """Loads any slimray model artifact. ``threads`` sets torch's intra-op threads (and ONNX Runtime's);
    ``script=False`` runs a PyTorch model eagerly instead of as a TorchScript trace (``traced_forward``)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(f"model folder {str(path)!r} does not exist")
    info = check_model_folder(path)
    backend = info.get("backend", "torch")
    if backend not in BACKENDS:
        raise InputError(f"{path}: unknown backend {backend!r} in {MODEL_INFO}; known: {sorted(BACKENDS)}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    info["threads"] = threads
    info["script"] = script
    tokenizer, forward = BACKENDS[backend](path, info)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))  # checked by check_model_folder
    id2label = info.get("id2label") or config.get("id2label") or {}
    labels = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
    max_length = info.get("max_length") or model_max_length(path) or min(
        int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    from jobs.modeling import is_tagger

    return InferenceModel(path=path, backend=backend, labels=labels, max_length=int(max_length), tokenizer=tokenizer,
                          forward=forward, kind="tagging" if is_tagger(config.get("architectures")) else "sequence")
