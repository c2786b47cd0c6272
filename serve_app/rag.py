"""The generative path of the assistant: a retriever over the knowledge index and a generator that composes an
answer from what it finds, each its own deployment in the graph.

    Ingress -> Retriever (sentence encoder + Qdrant, queries batched) -> Generator (causal LM, batched decoding)

``Retriever.search`` embeds queries in batches (``serve_app.batcher.Batcher``: whatever queued during the
previous encode) and answers the top ``k`` passages with their cosine scores and the index's calibrated
no-relevant-passage threshold. ``Generator`` decodes greedily with a token limit and a deadline; requests that
arrive while a batch decodes form the next batch (static batching: a batch ends when its longest answer
does), and each request's text streams to its caller as it is decoded.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ray import serve

from serve_app.api import MAX_SEARCH_K
from serve_app.batcher import Batcher

log = logging.getLogger("slimray.serve")

RETRIEVER, GENERATOR = "Retriever", "Generator"


@dataclass(frozen=True)
class GenerationLimits:
    max_new_tokens: int = 96
    timeout_s: float = 30.0
    max_batch_size: int = 8


@serve.deployment(name=RETRIEVER)
class RetrieverServer:
    """The knowledge index, searched by meaning."""

    def __init__(self, index_dir: str, threads: int):
        from jobs.knowledge import KnowledgeIndex

        self.index = KnowledgeIndex(index_dir, threads=threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.batcher = Batcher(self._run, max_batch_size=64)
        self._run(["warm-up"])

    def _run(self, queries: list[str]) -> list[list[dict[str, Any]]]:
        return [[h.as_dict() for h in hits] for hits in self.index.search_many(queries, MAX_SEARCH_K)]

    async def search(self, query: str, k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = await self.batcher.submit([query])
        return {"hits": result.rows[0][:k], "min_score": self.index.min_score, "replica": self.replica,
                "timing": {"queue_ms": (result.started - t0) * 1000, "search_ms": result.forward_s * 1000,
                           "batch": result.batch}}

    def info(self) -> dict[str, Any]:
        info = self.index.info
        return {"index": str(self.index.folder), "documents": info["documents"], "passages": info["passages"],
                "encoder": info["encoder"], "min_score": self.index.min_score,
                "calibration": info.get("calibration"), "store": info.get("qdrant_url") or "embedded Qdrant"}

    def __del__(self) -> None:
        index = getattr(self, "index", None)
        if index is not None:
            index.close()


@dataclass
class _Request:
    question: str
    passages: list[dict[str, Any]]
    queue: asyncio.Queue  # text pieces, then the final dict
    submitted: float


@serve.deployment(name=GENERATOR)
class GeneratorServer:
    """A causal LM (transformers, fp32) answering from passages; batched decoding across requests."""

    def __init__(self, generator_dir: str, threads: int, limits: GenerationLimits):
        import threading

        import torch

        from jobs.generation import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        self.dir, self.limits, self.threads = generator_dir, limits, threads
        self.tokenizer = load_tokenizer(generator_dir)
        self.model = load_causal_lm(generator_dir)
        self.model.eval()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._pending: list[_Request] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._lock = threading.Lock()
        self.batches = 0

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        from jobs.generation import Sequence_, decode_batch, prompt_ids

        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch, self._pending = (self._pending[:self.limits.max_batch_size],
                                    self._pending[self.limits.max_batch_size:])
            started = time.perf_counter()
            seqs = []
            for r in batch:
                def push(text: str, q: asyncio.Queue = r.queue) -> None:
                    loop.call_soon_threadsafe(q.put_nowait, text)
                seqs.append(Sequence_(prompt_ids(self.tokenizer, r.question, r.passages), self.limits.max_new_tokens,
                                      r.submitted + self.limits.timeout_s, on_text=push))
            try:
                await asyncio.to_thread(decode_batch, self.model, self.tokenizer, seqs, self._lock)
            except Exception as e:  # the callers get the error; the loop goes on
                for r in batch:
                    r.queue.put_nowait(e)
                continue
            self.batches += 1
            decode_ms = (time.perf_counter() - started) * 1000
            for r, s in zip(batch, seqs):
                r.queue.put_nowait({"text": s.text, "finish_reason": s.finish_reason, "tokens": len(s.tokens),
                                    "prompt_tokens": len(s.prompt), "replica": self.replica, "batch": len(batch),
                                    "timing": {"queue_ms": (started - r.submitted) * 1000,
                                               "first_token_ms": (s.first_token_s or 0) * 1000,
                                               "decode_ms": decode_ms}})

    def _submit(self, question: str, passages: list[dict[str, Any]]) -> asyncio.Queue:
        self._ensure_worker()
        request = _Request(question, passages, asyncio.Queue(), time.perf_counter())
        self._pending.append(request)
        self._arrived.set()
        return request.queue

    async def stream(self, question: str, passages: list[dict[str, Any]]) -> AsyncIterator[Any]:
        """Text pieces as they are decoded (str), then the final answer (dict: text, finish_reason, timing)."""
        queue = self._submit(question, passages)
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, dict):
                return

    async def generate(self, question: str, passages: list[dict[str, Any]]) -> dict[str, Any]:
        """The final answer alone."""
        queue = self._submit(question, passages)
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, dict):
                return item

    def info(self) -> dict[str, Any]:
        return {"generator": self.dir, "backend": "transformers", "max_new_tokens": self.limits.max_new_tokens,
                "timeout_s": self.limits.timeout_s, "max_batch_size": self.limits.max_batch_size,
                "threads": self.threads, "batches": self.batches}
