"""The generative path of the assistant: a retriever over the knowledge index and a generator that composes an
answer from what it finds, each its own deployment in the graph.

    Ingress -> Retriever (sentence encoder + Qdrant, queries batched) -> Generator (causal LM, batched decoding)

``Retriever.search`` embeds queries in batches (``serve_app.batcher.Batcher``: whatever queued during the
previous encode) and answers the top ``k`` passages with their cosine scores and the index's calibrated
no-relevant-passage threshold. ``Generator`` decodes greedily with a token limit and a deadline, on
transformers (static batching) or llama.cpp (continuous batching); each request's text streams to its caller
as it is decoded, and a caller that goes away stops its sequence.
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
    seq: Any  # jobs.generation.Sequence_
    queue: asyncio.Queue  # text pieces, then the final dict (or an exception)
    submitted: float
    batch: int = 0  # sequences decoding together when it started


@serve.deployment(name=GENERATOR)
class GeneratorServer:
    """A causal LM answering from passages, batched across requests.

    Backends: ``transformers`` (torch, fp32 or bf16; static batching: requests that arrive while a batch decodes form
    the next one, which starts when the longest answer of the current one ends) and ``llama_cpp`` (a GGUF file,
    ``jobs.llamacpp.Engine``: continuous batching, a request joins the running batch at the next token).
    """

    def __init__(self, generator: str, threads: int, limits: GenerationLimits, backend: str = "transformers",
                 gguf_file: str | None = None, dtype: str = "auto"):
        import threading

        from jobs.generation import load_tokenizer

        self.dir, self.limits, self.threads, self.backend = generator, limits, threads, backend
        self.tokenizer = load_tokenizer(generator)
        self.engine = self.model = None
        if backend == "llama_cpp":
            from jobs.llamacpp import Engine

            assert gguf_file, "build_app converts the generator to GGUF first"
            self.gguf = gguf_file
            self.engine = Engine(gguf_file, self.tokenizer, slots=limits.max_batch_size, threads=threads)
        else:
            import torch

            from jobs.generation import load_causal_lm, torch_dtype

            torch.set_num_threads(threads)
            self.dtype = torch_dtype(dtype)
            self.model = load_causal_lm(generator, dtype=self.dtype)
            self.model.eval()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._pending: list[_Request] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._lock = threading.Lock()
        self.batches = 0

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._continuous() if self.engine is not None else self._static())

    async def _next_work(self, busy: bool) -> None:
        while not self._pending and not busy:
            self._arrived.clear()
            await self._arrived.wait()

    def _take(self, n: int) -> list[_Request]:
        self._pending = [r for r in self._pending if r.seq.finish_reason is None]  # callers that went away
        taken, self._pending = self._pending[:n], self._pending[n:]
        return taken

    def _answer(self, r: _Request, ended: float) -> None:
        s = r.seq
        started = s.started if s.started is not None else ended
        r.queue.put_nowait({"text": s.text, "finish_reason": s.finish_reason, "tokens": len(s.tokens),
                            "prompt_tokens": len(s.prompt), "replica": self.replica, "batch": r.batch,
                            "timing": {"queue_ms": (started - r.submitted) * 1000,
                                       "first_token_ms": (s.first_token_s or 0) * 1000,
                                       "decode_ms": (ended - started) * 1000}})

    async def _static(self) -> None:
        from jobs.generation import decode_batch

        while True:
            await self._next_work(False)
            batch = self._take(self.limits.max_batch_size)
            if not batch:
                continue
            for r in batch:
                r.batch = len(batch)
            try:
                await asyncio.to_thread(decode_batch, self.model, self.tokenizer, [r.seq for r in batch], self._lock)
            except Exception as e:  # the callers get the error; the loop goes on
                for r in batch:
                    r.queue.put_nowait(e)
                continue
            self.batches += 1
            ended = time.perf_counter()
            for r in batch:
                self._answer(r, ended)

    async def _continuous(self) -> None:
        running: dict[int, _Request] = {}
        while True:
            await self._next_work(bool(running))
            joining = self._take(self.engine.capacity)
            for r in joining:
                running[id(r.seq)] = r
            try:
                ended = await asyncio.to_thread(self.engine.step, [r.seq for r in joining])
            except Exception as e:  # every sequence in the context is lost with it: fail them all, start afresh
                for r in running.values():
                    r.queue.put_nowait(e)
                running.clear()
                self.engine.reset()
                continue
            self.batches += 1
            for r in joining:
                r.batch = len(running)
            now = time.perf_counter()
            for s in ended:
                self._answer(running.pop(id(s)), now)

    def _submit(self, question: str, passages: list[dict[str, Any]]) -> _Request:
        from jobs.generation import Sequence_, prompt_ids

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        now = time.perf_counter()

        def push(text: str) -> None:  # called from the decoding thread
            loop.call_soon_threadsafe(queue.put_nowait, text)

        seq = Sequence_(prompt_ids(self.tokenizer, question, passages), self.limits.max_new_tokens,
                        now + self.limits.timeout_s, on_text=push)
        if self.engine is not None:
            self.engine.check(seq)  # a prompt longer than a sequence's context fails here, alone
        request = _Request(seq, queue, now)
        self._ensure_worker()
        self._pending.append(request)
        self._arrived.set()
        return request

    async def stream(self, question: str, passages: list[dict[str, Any]]) -> AsyncIterator[Any]:
        """Text pieces as they are decoded (str), then the final answer (dict: text, finish_reason, timing).
        A caller that goes away stops its sequence at the next token."""
        request = self._submit(question, passages)
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, dict):
                    return
        finally:
            request.seq.cancel()  # no-op once it has ended

    async def generate(self, question: str, passages: list[dict[str, Any]]) -> dict[str, Any]:
        """The final answer alone."""
        async for item in self.stream(question, passages):
            if isinstance(item, dict):
                return item
        raise RuntimeError("the generator's stream ended without an answer")

    def info(self) -> dict[str, Any]:
        info = {"generator": self.dir, "backend": self.backend, "max_new_tokens": self.limits.max_new_tokens,
                "timeout_s": self.limits.timeout_s, "max_batch_size": self.limits.max_batch_size,
                "threads": self.threads, "batches": self.batches}
        if self.engine is not None:
            info.update(gguf=self.gguf, batching="continuous")
        else:
            info.update(batching="static", dtype=str(self.dtype).removeprefix("torch."))
        return info
