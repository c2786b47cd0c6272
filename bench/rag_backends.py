"""The generator's CPU paths side by side: transformers in fp32 and bf16 against llama.cpp on GGUF at several
precisions, same fine-tuned model, same prompts, same threads.

    python bench/rag_backends.py --generator runs/rag/gen-ft --index runs/rag/kb

For each contender, on every held-out question (``--questions``, JSONL {question, passage_id, fact}) answered
from the retriever's top-3 passages, greedy, at most ``--max-new-tokens``:

- quality: the share of answers stating the reference fact and the share citing the right passage, and the
  paired bootstrap interval of the fact-match difference against transformers fp32 (the bar: within 3 points);
- throughput with 8 requests in flight: transformers decodes batches of 8 (static batching, what the Generator
  deployment does), llama.cpp keeps 8 sequences running and starts the next question as one ends (continuous
  batching, ``jobs.llamacpp.Engine``);
- one request at a time on the first ``--single`` questions: median time to the first token and tokens/s.

Results go to ``<out>/rag_backends.json`` as each contender finishes; a run started again with the same
settings keeps the contenders measured before. Last line:
``generator_backend_speedup: <the fastest within 3 points, tokens/s at 8 in flight / transformers fp32's>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rag import SAMPLE, scored  # noqa: E402
from cluster import storage  # noqa: E402
from cluster.settings import get_settings  # noqa: E402
from jobs import generation as gen  # noqa: E402
from jobs.knowledge import KnowledgeIndex, read_jsonl  # noqa: E402

QUALITY_BAR = 0.03  # fact match within 3 points of transformers fp32


def single(decode, tokenizer, questions: list[dict], passages: list[list[dict]], max_new: int) -> dict:
    first, rates = [], []
    for q, ps in zip(questions, passages):
        s = gen.Sequence_(gen.prompt_ids(tokenizer, q["question"], ps), max_new, time.perf_counter() + 600)
        t0 = time.perf_counter()
        decode([s])
        wall = time.perf_counter() - t0
        first.append(s.first_token_s * 1000)
        rates.append(len(s.tokens) / wall)
    return {"requests": len(first), "first_token_ms_p50": round(statistics.median(first), 1),
            "tokens_per_s": round(statistics.median(rates), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", required=True, help="fine-tuned generator folder (slimray finetune --task "
                        "generation)")
    parser.add_argument("--index", required=True, help="knowledge index folder (slimray index)")
    parser.add_argument("--questions", type=Path, default=SAMPLE / "rag" / "heldout.jsonl")
    parser.add_argument("--torch-dtypes", default="fp32,bf16", help="transformers precisions to try (fp32 first: "
                        "the reference)")
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m", help="llama.cpp precisions to try")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--single", type=int, default=12, help="questions asked one at a time")
    parser.add_argument("--out", type=Path, default=None, help="default: <storage_root>/bench/rag")
    args = parser.parse_args()
    out = (args.out or Path(get_settings().storage_root).expanduser() / "bench" / "rag").resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "generator": args.generator,
                     "threads": args.threads, "max_new_tokens": args.max_new_tokens, "contenders": {}}
    previous = out / "rag_backends.json"
    if previous.is_file():  # a run cut short: keep what it measured with the same settings
        old = json.loads(previous.read_text())
        if all(old.get(k) == results[k] for k in ("generator", "threads", "max_new_tokens")):
            results["contenders"] = old["contenders"]
            print(f"resuming: {', '.join(results['contenders'])} measured before", flush=True)

    def save() -> None:
        tmp = out / "rag_backends.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out / "rag_backends.json")

    questions = read_jsonl(args.questions, ("question", "passage_id", "fact"))
    index = KnowledgeIndex(args.index)
    passages = [[{"id": h.id, "title": h.title, "text": h.text} for h in hits]
                for hits in index.search_many([q["question"] for q in questions], 3)]
    index.close()
    tokenizer = gen.load_tokenizer(args.generator)
    prompts = [gen.prompt_ids(tokenizer, q["question"], p) for q, p in zip(questions, passages)]

    def run(name: str, decode_all, decode_one) -> None:
        if name in results["contenders"]:
            return
        seqs = [gen.Sequence_(p, args.max_new_tokens, 0.0) for p in prompts]
        t0 = time.perf_counter()
        decode_all(seqs)
        r = scored(name, questions, passages, seqs, time.perf_counter() - t0)
        r["single"] = single(decode_one, tokenizer, questions[:args.single], passages[:args.single],
                             args.max_new_tokens)
        results["contenders"][name] = r
        print(f"{name:22s} fact match {r['fact_match']:.3f}  cites {r['cites_right_passage']:.3f}  "
              f"8 in flight {r['tokens_per_s']:6.1f} tok/s  one at a time {r['single']['tokens_per_s']:5.1f} tok/s, "
              f"first token p50 {r['single']['first_token_ms_p50']:6.0f} ms", flush=True)
        save()

    import torch

    torch.set_num_threads(args.threads)
    for dtype in args.torch_dtypes.split(","):
        name = f"transformers {dtype}"
        if name in results["contenders"]:
            continue
        model = gen.load_causal_lm(args.generator, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))

        def static(seqs: list, model=model) -> None:  # batches of 8 of similar length, far deadline
            for s in seqs:
                s.deadline = time.perf_counter() + 600
            order = sorted(seqs, key=lambda s: len(s.prompt))
            for i in range(0, len(order), 8):
                gen.decode_batch(model, tokenizer, order[i:i + 8])

        run(name, static, lambda seqs, model=model: gen.decode_batch(model, tokenizer, seqs))

    from jobs.llamacpp import Engine, gguf_for

    for quant in args.quants.split(","):
        if f"llama.cpp {quant}" in results["contenders"]:
            continue
        t0 = time.perf_counter()
        path = gguf_for(args.generator, storage.cache_root() / "gguf", quant)
        convert_s = time.perf_counter() - t0
        engine = Engine(path, tokenizer, slots=8, threads=args.threads)

        def continuous(seqs: list, engine: Engine = engine) -> None:
            for s in seqs:
                s.deadline = time.perf_counter() + 600
            engine.run(seqs)

        run(f"llama.cpp {quant}", continuous, continuous)
        results["contenders"][f"llama.cpp {quant}"].update(gguf=str(path), gguf_mb=round(path.stat().st_size / 1e6),
                                                           convert_s=round(convert_s, 1))
        engine.close()
        save()

    # The machine's drift over the run: the reference's one-at-a-time figure measured again, last.
    model = gen.load_causal_lm(args.generator)
    again = single(lambda seqs: gen.decode_batch(model, tokenizer, seqs), tokenizer, questions[:args.single],
                   passages[:args.single], args.max_new_tokens)
    first = results["contenders"]["transformers fp32"]["single"]
    results["drift"] = {"transformers_fp32_single_first": first, "transformers_fp32_single_last": again}
    print(f"drift check: transformers fp32 one at a time {first['tokens_per_s']} tok/s first, {again['tokens_per_s']} "
          f"last (first token {first['first_token_ms_p50']:.0f} / {again['first_token_ms_p50']:.0f} ms)", flush=True)
    base = results["contenders"]["transformers fp32"]
    a = [float(r["fact_match"]) for r in base["answers"]]
    best = None
    for name, r in results["contenders"].items():
        if name == "transformers fp32":
            continue
        r["vs_transformers"] = ci = gen.paired_bootstrap(a, [float(x["fact_match"]) for x in r["answers"]])
        r["within_bar"] = abs(ci["diff"]) <= QUALITY_BAR
        r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
        print(f"{name}: fact match {100 * ci['diff']:+.1f} points vs transformers (95% CI {100 * ci['ci_low']:+.1f} "
              f"to {100 * ci['ci_high']:+.1f}), {'within' if r['within_bar'] else 'outside'} the 3-point bar; "
              f"{r['speedup']}x the tokens/s at 8 in flight", flush=True)
        if r["within_bar"] and (best is None or r["tokens_per_s"] > results["contenders"][best]["tokens_per_s"]):
            best = name
    results["fastest_within_bar"] = best
    results["load_average_after"] = os.getloadavg()
    save()
    print(f"fastest within the bar: {best}; results {out / 'rag_backends.json'}")
    print(f"load average after: {os.getloadavg()}")
    print(f"generator_backend_speedup: {results['contenders'][best]['speedup'] if best else 0}")


if __name__ == "__main__":
    main()
