"""Retrieval and generated answers on the Harbor Lane Bank knowledge base: before and after the LoRA fine-tune.

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/rag.py'        # index, fine-tune, evaluate
    python bench/rag.py --generator runs/rag/gen-ft                            # evaluate an existing fine-tune

1. Index the sample's documents (``slimray index``, calibrated on ``rag/calibration.jsonl``) and score
   retrieval on the held-out questions (``--questions``, JSONL {question, passage_id, fact}): recall@1/3/5 of
   the passage holding the answer, dense (all-MiniLM-L6-v2 + Qdrant) against BM25 (bm25s) on the same
   passages; and how the calibrated threshold sorts the calibration questions.
2. Unless ``--generator`` is given: training records from ``rag/train.jsonl`` (hand-written questions and
   answers, the retriever's top-3 passages attached, ``jobs.generation.sft_records``) and the fine-tune
   (``slimray finetune --task generation``: SmolLM2-135M-Instruct, LoRA, 2 workers, ZeRO-3).
3. Both generators answer every held-out question from the retriever's top-3 passages (what the served
   assistant does), greedy, at most 64 new tokens: the share of answers that state the reference fact
   (``jobs.generation.fact_match``), the share that cite the right passage, and the paired bootstrap 95%
   interval of the fact-match difference. Answers are written to the output for reading.

Results go to ``<out>/rag.json`` as each part finishes. Last line: ``rag_fact_match_gain: <points>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.settings import get_settings  # noqa: E402
from jobs import generation as gen  # noqa: E402
from jobs.knowledge import BM25, IndexConfig, KnowledgeIndex, read_jsonl, recall_at  # noqa: E402
from jobs.knowledge import main as build_index  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "samples" / "harbor_bank"


def save(out: Path, results: dict) -> None:
    tmp = out / "rag.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out / "rag.json")


def retrieval(index: KnowledgeIndex, questions: list[dict], calibration: list[dict]) -> dict:
    gold = [q["passage_id"] for q in questions]
    texts = [q["question"] for q in questions]
    t0 = time.perf_counter()
    dense = [[h.id for h in hits] for hits in index.search_many(texts, 5)]
    dense_ms = (time.perf_counter() - t0) * 1000 / len(texts)
    bm25 = BM25(list(index.passages.values())).search_many(texts, 5)
    held = [hits[0].score for hits in index.search_many(texts, 1)]
    tops = [hits[0].score for hits in index.search_many([c["question"] for c in calibration], 1)]
    answerable = [s >= index.min_score for s, c in zip(tops, calibration) if c["passage_id"]]
    unanswerable = [s < index.min_score for s, c in zip(tops, calibration) if not c["passage_id"]]
    return {
        "questions": len(questions), "passages": len(index.passages),
        "dense": {f"recall@{k}": recall_at(gold, dense, k) for k in (1, 3, 5)},
        "bm25": {f"recall@{k}": recall_at(gold, bm25, k) for k in (1, 3, 5)},
        "dense_ms_per_query": round(dense_ms, 2),
        "min_score": index.min_score,
        "heldout_above_threshold": sum(s >= index.min_score for s in held) / len(held),
        "calibration_questions": {"answerable_kept": f"{sum(answerable)}/{len(answerable)}",
                                  "unanswerable_refused": f"{sum(unanswerable)}/{len(unanswerable)}"},
    }


def scored(model_name: str, questions: list[dict], passages: list[list[dict]], seqs: list[gen.Sequence_],
           wall: float) -> dict:
    """Each answer's fact match and citation, and the totals."""
    rows = []
    for q, s, ps in zip(questions, seqs, passages):
        cited = gen.citations(s.text)
        rows.append({"question": q["question"], "fact": q["fact"], "passage_id": q["passage_id"], "answer": s.text,
                     "fact_match": gen.fact_match(gen.strip_citations(s.text), q["fact"]),
                     "cites_right_passage": q["passage_id"] in cited, "retrieved": [p["id"] for p in ps],
                     "finish_reason": s.finish_reason, "tokens": len(s.tokens)})
    tokens = sum(r["tokens"] for r in rows)
    return {"model": model_name, "fact_match": sum(r["fact_match"] for r in rows) / len(rows),
            "cites_right_passage": sum(r["cites_right_passage"] for r in rows) / len(rows),
            "wall_s": round(wall, 1), "new_tokens": tokens, "tokens_per_s": round(tokens / wall, 1), "answers": rows}


def answer_all(model_name: str, questions: list[dict], passages: list[list[dict]], threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    tokenizer, model = gen.load_tokenizer(model_name), gen.load_causal_lm(model_name)
    model.eval()
    t0 = time.perf_counter()
    seqs = gen.generate(model, tokenizer, [q["question"] for q in questions], passages, max_new_tokens=64,
                        batch_size=8)
    return scored(model_name, questions, passages, seqs, time.perf_counter() - t0)


def finetune(records: Path, out: Path, epochs: float) -> None:
    cmd = [sys.executable, "-m", "jobs.finetune", "--task", "generation", "--data", str(records), "--workers", "2",
           "--zero-stage", "3", "--epochs", str(epochs), "--checkpoint-every", "20", "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=Path, default=SAMPLE / "rag" / "heldout.jsonl")
    parser.add_argument("--calibration", type=Path, default=SAMPLE / "rag" / "calibration.jsonl")
    parser.add_argument("--train", type=Path, default=SAMPLE / "rag" / "train.jsonl")
    parser.add_argument("--docs", type=Path, default=SAMPLE / "knowledge")
    parser.add_argument("--generator", help="fine-tuned generator folder (default: fine-tune one here)")
    parser.add_argument("--base", default=gen.DEFAULT_GENERATOR, help="the generator before fine-tuning")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: <storage_root>/bench/rag")
    args = parser.parse_args()
    out = (args.out or Path(get_settings().storage_root).expanduser() / "bench" / "rag").resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    build_index(IndexConfig(docs=args.docs, out=out / "kb", calibration=args.calibration))
    index = KnowledgeIndex(out / "kb")
    questions = read_jsonl(args.questions, ("question", "passage_id", "fact"))
    results["retrieval"] = retrieval(index, questions, read_jsonl(args.calibration, ("question", "passage_id")))
    r = results["retrieval"]
    print(f"retrieval on {r['questions']} held-out questions, {r['passages']} passages: dense recall@1/3/5 "
          + " / ".join(f"{v:.3f}" for v in r["dense"].values()) + "; BM25 "
          + " / ".join(f"{v:.3f}" for v in r["bm25"].values()), flush=True)
    save(out, results)

    generator = args.generator
    if generator is None:
        records = out / "sft.jsonl"
        gen.write_jsonl(records, gen.sft_records(read_jsonl(args.train, ("question", "passage_id", "answer")),
                                                 index.search_many, index.passages, 3, seed=0))
        t0 = time.perf_counter()
        generator = str(out / "gen-ft")
        finetune(records, Path(generator), args.epochs)
        results["finetune_wall_s"] = round(time.perf_counter() - t0, 1)
    results["generator"] = generator
    metrics = Path(generator) / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        results["finetune"] = {k: m.get(k) for k in ("token_accuracy", "loss", "steps", "wall_s",
                                                     "train_samples_per_s")}
        results["finetune"]["per_rank"] = m.get("distributed", {}).get("per_rank")

    passages = [[{"id": h.id, "title": h.title, "text": h.text} for h in hits]
                for hits in index.search_many([q["question"] for q in questions], 3)]
    index.close()
    for name, model in (("base", args.base), ("finetuned", generator)):
        results[name] = answer_all(model, questions, passages, args.threads)
        print(f"{name} ({model}): fact match {results[name]['fact_match']:.3f}, cites the right passage "
              f"{results[name]['cites_right_passage']:.3f}, {results[name]['tokens_per_s']} new tokens/s "
              f"(batches of 8)", flush=True)
        save(out, results)
    a = [float(r["fact_match"]) for r in results["base"]["answers"]]
    b = [float(r["fact_match"]) for r in results["finetuned"]["answers"]]
    results["fact_match_gain"] = gen.paired_bootstrap(a, b)
    results["load_average_after"] = os.getloadavg()
    save(out, results)
    ci = results["fact_match_gain"]
    print(f"fact match gain {100 * ci['diff']:+.1f} points (95% CI {100 * ci['ci_low']:+.1f} to "
          f"{100 * ci['ci_high']:+.1f}, paired bootstrap over {ci['n']} questions); results {out / 'rag.json'}")
    print(f"load average after: {os.getloadavg()}")
    print(f"rag_fact_match_gain: {100 * ci['diff']:.1f}")


if __name__ == "__main__":
    main()
