"""Generated answers served by the graph: first-token latency and tokens/s at concurrency 1 and 8, with the
graph's overhead separated from the generator's own work.

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/rag_serve.py --intent-model runs/hb/ft \
        --index runs/bench/rag/kb --generator runs/bench/rag/gen-ft'

1. in-process: the generator alone (same backend, loader, threads and greedy decoding as its deployment)
   answers the held-out questions from their top-3 passages, one at a time and 8 at once (transformers:
   batches of 8; llama.cpp: 8 sequences running, the next joining as one ends): time to the first token (the
   prompt's prefill) and new tokens/s.
2. served: ``slimray serve --model --index --generator`` (the YAML's options; the hand-off threshold
   overridden to 1.0 so that every message takes the generative path: classify, search, generate), and
   streaming clients (``/v1/assist?stream=true``, closed loop) at concurrency 1 and 8: time to the first
   ``token`` event, time to ``done``, new tokens/s per stream and in all. Overhead = served first-token time
   minus the in-process one at the same concurrency (classification, retrieval, the hops, HTTP and SSE).

``--backend llama_cpp`` measures the llama.cpp backend (the generator converted to GGUF at ``--quant``).
Results to ``<out>/rag_serve_<backend>_<precision>.json``. Last line:
``rag_serve_first_token_overhead_ms_c1: <ms>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.settings import get_settings  # noqa: E402
from jobs import generation as gen  # noqa: E402
from jobs.knowledge import KnowledgeIndex, read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "samples" / "harbor_bank"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def in_process(generator: str, questions: list[str], passages: list[list[dict]], threads: int,
               max_new_tokens: int, backend: str, quant: str, dtype: str) -> dict:
    tok = gen.load_tokenizer(generator)
    if backend == "llama_cpp":
        from cluster import storage
        from jobs.llamacpp import Engine, gguf_for

        engine = Engine(gguf_for(generator, storage.cache_root() / "gguf", quant), tok, slots=8, threads=threads)

        def decode(seqs: list, batch: int) -> None:  # 8 at once: each joins as a slot frees (continuous)
            for group in ([seqs] if batch > 1 else [[s] for s in seqs]):
                engine.run(group)
    else:
        import torch

        torch.set_num_threads(threads)
        model = gen.load_causal_lm(generator, dtype=gen.torch_dtype(dtype))
        model.eval()

        def decode(seqs: list, batch: int) -> None:
            for i in range(0, len(seqs), batch):
                gen.decode_batch(model, tok, seqs[i:i + batch])
    out = {}
    for batch in (1, 8):
        n = 8 if batch == 1 else 16
        seqs = [gen.Sequence_(gen.prompt_ids(tok, q, p), max_new_tokens, time.perf_counter() + 600)
                for q, p in zip(questions[:n], passages[:n])]
        t0 = time.perf_counter()
        decode(seqs, batch)
        wall = time.perf_counter() - t0
        tokens = sum(len(s.tokens) for s in seqs)
        out[f"batch{batch}"] = {"first_token_ms_p50": 1000 * statistics.median(s.first_token_s for s in seqs),
                                "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}
        print(f"in-process {backend}, {batch} at once: first token p50 "
              f"{out[f'batch{batch}']['first_token_ms_p50']:.0f} ms, {tokens / wall:.1f} new tokens/s", flush=True)
    return out


async def stream_one(client, question: str) -> dict:
    t0 = time.perf_counter()
    first, pieces, done = None, [], None
    async with client.stream("POST", "/v1/assist?stream=true", json={"message": question}) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        buffer = ""
        async for chunk in r.aiter_text():
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.splitlines())
                if fields["event"] == "token":
                    first = first or time.perf_counter()
                    pieces.append(json.loads(fields["data"])["text"])
                else:
                    done = json.loads(fields["data"])
    end = time.perf_counter()
    return {"first_token_ms": 1000 * ((first or end) - t0), "total_ms": 1000 * (end - t0), "text": "".join(pieces),
            "source": done["source"] if done else None}


async def served(url: str, questions: list[str], concurrency: int, per_client: int, tokenizer) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await stream_one(client, questions[0])  # warm-up
        queue = list(questions[:concurrency * per_client])
        results: list[dict] = []

        async def worker():
            while queue:
                q = queue.pop()
                results.append({**await stream_one(client, q), "question": q})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    generated = [r for r in ok if r["source"] == "generated"]
    # New tokens: the streamed text of each generated answer, tokenized again.
    tokens = sum(len(tokenizer.encode(r["text"], add_special_tokens=False)) for r in generated)
    return {"requests": len(results), "errors": len(results) - len(ok), "generated": len(generated),
            "first_token_ms_p50": pct([r["first_token_ms"] for r in ok], 0.5),
            "first_token_ms_p95": pct([r["first_token_ms"] for r in ok], 0.95),
            "total_ms_p50": pct([r["total_ms"] for r in ok], 0.5), "wall_s": round(wall, 2),
            "tokens_per_s_all_streams": round(tokens / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--intent-model", required=True, help="any intent classifier folder (every message is "
                        "sent down the generative path)")
    parser.add_argument("--index", required=True)
    parser.add_argument("--generator", required=True)
    parser.add_argument("--questions", type=Path, default=SAMPLE / "rag" / "heldout.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the generator (both sides)")
    parser.add_argument("--backend", choices=("transformers", "llama_cpp"), default="transformers")
    parser.add_argument("--quant", default="f16", help="llama_cpp: GGUF precision of the generator")
    parser.add_argument("--dtype", default="auto", help="transformers: the generator's precision (auto, fp32, bf16)")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = (args.out or Path(get_settings().storage_root).expanduser() / "bench" / "rag").resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    questions = [q["question"] for q in read_jsonl(args.questions, ("question",))]
    index = KnowledgeIndex(args.index)
    passages = [[{"id": h.id, "title": h.title, "text": h.text} for h in hits if h.score >= index.min_score]
                for hits in index.search_many(questions, 3)]
    index.close()
    keep = [i for i, p in enumerate(passages) if p]  # the questions the served path will generate for
    questions, passages = [questions[i] for i in keep], [passages[i] for i in keep]
    results: dict = {"generator": args.generator, "backend": args.backend, "threads": args.threads,
                     "max_new_tokens": args.max_new_tokens}
    if args.backend == "llama_cpp":
        results["quant"] = args.quant
    else:
        results["dtype"] = str(gen.torch_dtype(args.dtype)).removeprefix("torch.")
    results["in_process"] = in_process(args.generator, questions, passages, args.threads, args.max_new_tokens,
                                       args.backend, args.quant, args.dtype)
    name = f"rag_serve_{args.backend}_{results.get('dtype') or args.quant}.json"

    tokenizer, n_served = gen.load_tokenizer(args.generator), 40
    from ray import serve

    from serve_app.app import AppArgs
    from serve_app.run import apply_serve_env, deploy

    apply_serve_env(args.port)
    app = AppArgs(model=args.intent_model, index=args.index, generator=args.generator, threads=args.threads,
                  generator_backend=args.backend, generator_quant=args.quant, generator_dtype=args.dtype,
                  max_new_tokens=args.max_new_tokens, routing={"handoff_threshold": 1.0}, playbook=str(
                      SAMPLE / "playbook.yaml"))
    url = deploy(app, port=args.port)
    try:
        for concurrency, per_client in ((1, 8), (8, 2)):
            r = asyncio.run(served(url, questions[:n_served], concurrency, per_client, tokenizer))
            base = results["in_process"][f"batch{min(concurrency, 8)}"]
            r["first_token_overhead_ms"] = r["first_token_ms_p50"] - base["first_token_ms_p50"]
            results[f"served_c{concurrency}"] = r
            print(f"served c={concurrency}: first token p50 {r['first_token_ms_p50']:.0f} ms (in-process "
                  f"{base['first_token_ms_p50']:.0f}: overhead {r['first_token_overhead_ms']:.0f} ms), done p50 "
                  f"{r['total_ms_p50']:.0f} ms, {r['tokens_per_s_all_streams']} new tokens/s over all streams, "
                  f"{r['errors']} errors, {r['generated']}/{r['requests']} generated", flush=True)
            (out / name).write_text(json.dumps(results, indent=2))
    finally:
        serve.shutdown()
    results["load_average_after"] = os.getloadavg()
    (out / name).write_text(json.dumps(results, indent=2))
    print(f"load average after: {os.getloadavg()}")
    print(f"rag_serve_first_token_overhead_ms_c1: {results['served_c1']['first_token_overhead_ms']:.0f}")


if __name__ == "__main__":
    main()
