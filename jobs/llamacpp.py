"""The llama.cpp path of the generator: a fine-tuned causal LM written as GGUF, quantized by llama.cpp itself,
and decoded with continuous batching.

``gguf_for(model, root, quant)`` returns a GGUF file for what ``--generator`` names:

- a ``.gguf`` file, or a folder holding one and no ``config.json``: used as it is;
- ``smollm2`` (a packaged GGUF): the package's file;
- a Hugging Face folder written by ``slimray finetune --task generation`` from a GGUF base: its weights written
  into a copy of the base GGUF (metadata and tokenizer kept, tensors replaced; q/k rows permuted back to
  llama.cpp's rotary layout), in f16, then quantized by ``llama_model_quantize`` to ``quant``. The file is
  cached under ``root`` by the weights' identity, so replicas and later runs reuse it.

``Engine`` keeps up to ``slots`` sequences in one llama.cpp context, each its own KV sequence: every step
decodes one token for each running sequence plus the whole prompt of any sequence that joined since, so a
request starts at the next step instead of waiting for a batch to end (continuous batching).

llama-cpp-python is an optional dependency (it compiles llama.cpp at install): ``pip install
llama-cpp-python``; the transformers backend needs none of this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, get_args

from jobs.errors import InputError
from jobs.generation import Sequence_, packaged_gguf, stop_ids

log = logging.getLogger("slimray.generation")

Quant = Literal["f16", "bf16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"]  # llama.cpp's LLAMA_FTYPE_MOSTLY_<NAME>
QUANTS = get_args(Quant)
DEFAULT_QUANT: Quant = "f16"
SLOT_TOKENS = 2048  # context of one sequence: prompt + answer


def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise InputError("--generator-backend llama_cpp needs llama-cpp-python (pip install llama-cpp-python; it "
                         "compiles llama.cpp, a few minutes)") from None
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs every tensor it loads; keep its errors only
    return llama_cpp


# ----------------------------------------------------------------------------------------------------------
# GGUF export.


def base_gguf(folder: Path) -> Path | None:
    """The GGUF a fine-tuned folder was trained from (its manifest's ``base_model_path``), if any."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    base = json.loads(manifest.read_text(encoding="utf-8")).get("base_model_path") or ""
    return Path(base) if base.endswith(".gguf") and Path(base).is_file() else None


def permute_rotary(weights: Any, n_head: int) -> Any:
    """Hugging Face's q/k projection rows -> llama.cpp's rotary layout (the inverse of what transformers' GGUF
    loader does; the same as llama.cpp's convert_hf_to_gguf.py)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def hf_tensors(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} has no *.safetensors weights to write as GGUF")
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                out[name] = st.get_tensor(name)
    return out


def write_gguf(folder: Path, template: Path, out: Path) -> None:
    """``folder``'s weights (a llama-architecture Hugging Face model) in f16 GGUF, with ``template``'s metadata
    and tokenizer. Refuses a model whose shapes or tensor names do not match the template."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(template)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise InputError(f"GGUF export supports llama-architecture models; {template.name} is {arch!r}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    n_blocks = reader.fields["llama.block_count"].contents()
    if n_blocks != config["num_hidden_layers"]:
        raise InputError(f"{folder} has {config['num_hidden_layers']} layers, its base {template.name} {n_blocks}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    tensors = {}
    for hf_name, array in hf_tensors(folder).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"{folder}: tensor {hf_name!r} has no llama.cpp name")
        if name.endswith("attn_q.weight"):
            array = permute_rotary(array, n_head)
        elif name.endswith("attn_k.weight"):
            array = permute_rotary(array, n_kv)
        tensors[name] = array
    writer = gguf.GGUFWriter(out, arch)
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for field in reader.fields.values():
        if field.name in skip or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in reader.tensors:
        if t.name not in tensors:
            raise InputError(f"{folder} has no weight for {template.name}'s tensor {t.name}")
        array = tensors[t.name]
        want = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if tuple(array.shape) != want:
            raise InputError(f"{folder}: {t.name} has shape {tuple(array.shape)}, {template.name} {want}")
        writer.add_tensor(t.name, array.astype(np.float32 if array.ndim == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer (what its ``llama-quantize`` tool runs)."""
    import ctypes

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant}")


def gguf_for(model: str, root: Path, quant: str = DEFAULT_QUANT) -> Path:
    """A GGUF file of ``model`` for llama.cpp (see the module's docstring), converting once if needed."""
    if quant not in QUANTS:
        raise InputError(f"--generator-quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    packaged = packaged_gguf(model)
    if packaged:
        return Path(packaged[0]) / packaged[1]
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir():
        raise InputError(f"--generator {model!r} is neither a folder nor a .gguf file")
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and not (path / "config.json").is_file():
        return ggufs[0]
    template = base_gguf(path)
    if template is None:
        raise InputError(f"{path} is a Hugging Face folder whose base is not a GGUF model: slimray writes GGUF "
                         "only for models fine-tuned from a GGUF base (such as smollm2). Convert it with "
                         "llama.cpp's convert_hf_to_gguf.py and pass the .gguf file")
    weights = sorted(path.glob("*.safetensors"))
    key = ":".join(f"{w.resolve()}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    out = root / f"{path.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}-{quant}.gguf"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{random.getrandbits(32):08x}"
    f16, final = root / f".{out.stem}.f16-{tag}.partial", root / f".{out.stem}-{tag}.partial"
    started = time.perf_counter()
    log.info("writing %s as GGUF (%s) into %s", path, quant, out)
    try:
        write_gguf(path, template, f16)
        if quant == "f16":
            f16.rename(final)
        else:
            quantize(f16, final, quant)
        final.rename(out)  # atomic: a concurrent converter's rename wins, both files are whole
    finally:
        for f in (f16, final):
            f.unlink(missing_ok=True)
    log.info("GGUF written in %.0f s: %s (%.0f MB)", time.perf_counter() - started, out.name,
             out.stat().st_size / 1e6)
    return out


# ----------------------------------------------------------------------------------------------------------
# Decoding.


class Engine:
    """Greedy decoding of up to ``slots`` sequences at once in one llama.cpp context (continuous batching).

    Not thread-safe: one thread calls ``step`` (the Generator deployment runs it off its event loop).
    """

    def __init__(self, gguf_file: Path | str, tokenizer: Any, slots: int = 8, threads: int = 1,
                 slot_tokens: int = SLOT_TOKENS):
        import numpy as np

        self.llama = require_llama_cpp()
        self.np, self.tokenizer, self.slot_tokens = np, tokenizer, slot_tokens
        self.stop = stop_ids(tokenizer)
        self.llama.llama_backend_init()
        self.model = self.llama.llama_model_load_from_file(str(gguf_file).encode(),
                                                            self.llama.llama_model_default_params())
        if not self.model:
            raise InputError(f"llama.cpp could not load {gguf_file}")
        params = self.llama.llama_context_default_params()
        params.n_ctx = slots * slot_tokens
        params.n_batch = params.n_ctx  # a step holds every joining prompt whole
        params.n_ubatch = 512
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        self.ctx = self.llama.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        self.memory = self.llama.llama_get_memory(self.ctx)
        self.n_vocab = self.llama.llama_vocab_n_tokens(self.llama.llama_model_get_vocab(self.model))
        if self.n_vocab < len(tokenizer):
            raise InputError(f"{gguf_file} has {self.n_vocab} tokens, its tokenizer {len(tokenizer)}")
        self.batch = self.llama.llama_batch_init(params.n_batch, 0, 1)
        self.free = list(range(slots - 1, -1, -1))
        self.running: dict[int, Sequence_] = {}

    @property
    def capacity(self) -> int:
        return len(self.free)

    def check(self, seq: Sequence_) -> None:
        if len(seq.prompt) + seq.max_new_tokens > self.slot_tokens:
            raise InputError(f"a prompt of {len(seq.prompt)} tokens plus {seq.max_new_tokens} new ones exceeds the "
                             f"generator's {self.slot_tokens}-token context per sequence")

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        b, i = self.batch, self.batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq_id
        b.n_tokens = i + 1
        return i

    def step(self, joining: Sequence[Sequence_] = ()) -> list[Sequence_]:
        """Adds ``joining`` (at most ``capacity``), decodes one token for every running sequence, and returns
        those that ended (their slots free again)."""
        if len(joining) > len(self.free):
            raise ValueError(f"{len(joining)} sequences join but only {len(self.free)} slots are free")
        for s in joining:
            self.check(s)
        ended = self._release(lambda s: s.finish_reason is not None)  # cancelled meanwhile
        self.batch.n_tokens = 0
        rows: list[tuple[Sequence_, int]] = []
        now = time.perf_counter()
        for slot, s in self.running.items():
            rows.append((s, self._add(s.tokens[-1], len(s.prompt) + len(s.tokens) - 1, slot, True)))
        for s in joining:
            slot = self.free.pop()
            self.llama.llama_memory_seq_rm(self.memory, slot, -1, -1)
            s.started = now
            for pos, token in enumerate(s.prompt):
                row = self._add(token, pos, slot, pos == len(s.prompt) - 1)
            rows.append((s, row))
            self.running[slot] = s
        if not rows:
            return ended
        rc = self.llama.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        now = time.perf_counter()
        for s, row in rows:
            logits = self.np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
            s.accept(int(logits[:len(self.tokenizer)].argmax()), self.tokenizer, self.stop, now)
        return ended + self._release(lambda s: s.finish_reason is not None)

    def _release(self, done: Any) -> list[Sequence_]:
        out = []
        for slot in [slot for slot, s in self.running.items() if done(s)]:
            s = self.running.pop(slot)
            self.free.append(slot)
            s.finish(self.tokenizer)
            out.append(s)
        return out

    def reset(self) -> None:
        """Drops every running sequence and clears the context (after a failed step)."""
        self.llama.llama_memory_clear(self.memory, True)
        self.free.extend(self.running)
        self.running.clear()

    def run(self, seqs: Iterable[Sequence_]) -> None:
        """Decodes ``seqs`` to the end, each joining as soon as a slot is free."""
        waiting = list(seqs)
        waiting.reverse()
        while waiting or self.running:
            joining = [waiting.pop() for _ in range(min(self.capacity, len(waiting)))]
            self.step(joining)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.llama.llama_batch_free(self.batch)
            self.llama.llama_free(self.ctx)
            self.llama.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        self.close()
