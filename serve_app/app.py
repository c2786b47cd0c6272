"""The Serve graph: one FastAPI ingress that also runs the assistant, and one model deployment per version.

    HTTP -> Ingress (validation, auth, canary split, playbook, hand-off) -> Model / CanaryModel (batched)
                                                                          -> EntityModel (batched)
                                                                          -> Monitor -> SentimentModel (batched)
                                                                                     -> the monitor's store
                                                                          -> Retriever (knowledge index)
                                                                          -> Generator (causal LM, batched)

The intent model (``Model``, with an optional ``CanaryModel``), the entity tagger (``EntityModel``) and the
news-sentiment monitor (``Monitor``, scoring with ``SentimentModel`` and keeping its state in a database,
``jobs.monitor``) are separate deployments, each scaled on its own; any of them may be served alone, and
with both intent and entity models an assist message goes to the two in parallel. Model replicas batch
with ``serve_app.batcher.Batcher``; every answer says where its time went (``Server-Timing``). With a
knowledge index (``Retriever``) and a generator (``Generator``, ``serve_app.rag``), the assistant answers what
its playbook does not cover from the company's documents.

``build_app(args)`` is the only entry point (``serve_app.app:build_app`` in ``serve_config.yaml``): Serve
calls it with the YAML's ``args`` (``serve deploy``), or with the args ``serve_app.run.deploy`` puts there.
Live knobs come through ``user_config``: ``RoutingKnobs`` for the ingress (canary fraction, hand-off
threshold override), ``BatchKnobs`` for each model deployment (batch size, batch wait), ``AlertRule`` for the
monitor. Replica counts, autoscaling, requests in flight and resources live in ``serve_config.yaml`` only:
the decorators set none.
"""

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, SecretStr, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from cluster.settings import get_settings
from jobs.config import StrictModel
from jobs.errors import InputError
from jobs.llamacpp import DEFAULT_QUANT, QUANTS, Quant
from jobs.modeling import check_model_folder, is_tagger
from jobs.monitor import AlertRule
from serve_app.api import Classification, Limits, ModelUnavailable, Search, Tagging, make_api
from serve_app.assistant import Decision, Playbook, find_playbook, load_playbook, slot_types
from serve_app.batcher import Batcher
from serve_app.rag import GenerationLimits, GeneratorServer, RetrieverServer

log = logging.getLogger("slimray.serve")

INGRESS, MODEL, CANARY, ENTITY = "Ingress", "Model", "CanaryModel", "EntityModel"
SENTIMENT, MONITOR = "SentimentModel", "Monitor"
LOCAL_QUEUE = 16  # single texts the ingress's own copy of the primary holds queued before spilling to Model


class BatchKnobs(StrictModel):
    """Live knobs of a model deployment (its ``user_config``)."""

    max_batch_size: int = Field(default=64, ge=1, le=512, description="Most texts in one forward pass "
                                "(requests with more texts are split); keep <= max_ongoing_requests")
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=1, description="Seconds a batch smaller than "
                                        "max_batch_size waits for more texts before its forward; 0: none (under "
                                        "load a batch takes what queued during the previous forward anyway)")


class RoutingKnobs(StrictModel):
    """Live knobs of the ingress (its ``user_config``)."""

    canary_fraction: float = Field(default=0.0, ge=0, le=1, description="Share of requests the canary version "
                                   "answers (ignored without a canary)")
    handoff_threshold: float | None = Field(default=None, ge=0, le=1, description="Override of every version's "
                                            "calibrated hand-off threshold; null uses the calibration")
    model_calls_in_flight: int = Field(default=6, ge=0, le=256, description="Calls the ingress keeps open to the "
                                       "primary model deployment; requests that arrive while all are open wait at "
                                       "the ingress and go together in the next call, so that one call carries "
                                       "many messages (a call costs a few ms of CPU whatever it carries). About 2 "
                                       "per Model replica at its max_replicas; 0: one call per request")


class AppArgs(StrictModel):
    """Arguments of ``build_app``: which model versions to serve and how the assistant behaves."""

    model: str | None = Field(default=None, description="Intent model: artifact folder of the primary version "
                              "(fine-tuned or compressed; any backend jobs.inference loads)")
    version: str | None = Field(default=None, description="Name of the primary version (default: folder name)")
    canary_model: str | None = Field(default=None, description="Model folder of a second version that gets "
                                     "routing.canary_fraction of the traffic")
    canary_version: str | None = Field(default=None, description="Name of the canary version (default: folder name)")
    entity_model: str | None = Field(default=None, description="Entity tagger's artifact folder (a --task ner "
                                     "fine-tune or compression): adds /v1/entities and fills playbook slots")
    entity_version: str | None = Field(default=None, description="Name of the entity model's version "
                                       "(default: folder name)")
    sentiment_model: str | None = Field(default=None, description="Sentiment classifier's artifact folder: adds "
                                        "the monitor (/v1/observations, /v1/alerts, /v1/topics, "
                                        "/v1/topics/{topic}/trend)")
    sentiment_version: str | None = Field(default=None, description="Name of the sentiment model's version "
                                          "(default: folder name)")
    monitor_store: str | None = Field(default=None, description="The monitor's database URL: sqlite:///FILE or "
                                      "postgresql+psycopg://... (default: sqlite:///<storage_root>/monitor/"
                                      "monitor.db)")
    alerting: AlertRule = Field(default_factory=AlertRule, description="Initial alert rule of the monitor "
                                "(a user_config in the Serve YAML replaces it)")
    index: str | None = Field(default=None, description="Knowledge index folder (`slimray index`): adds a Retriever "
                              "deployment and /v1/search")
    generator: str | None = Field(default=None, description="Causal LM folder (e.g. a `slimray finetune --task "
                                  "generation` output) or 'smollm2': adds a Generator deployment; /v1/assist then "
                                  "answers from the index what the playbook does not cover (needs index)")
    generator_backend: Literal["transformers", "llama_cpp"] = Field(
        default="transformers", description="transformers: torch, static batching; llama_cpp: the generator as "
        "GGUF (converted once, cached) through llama.cpp, continuous batching (needs llama-cpp-python)")
    generator_dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="transformers: the generator's precision; auto: bf16 where the CPU has AMX or "
        "AVX512-BF16 (faster there, fact match within 3 points of fp32 on the sample), else fp32")
    generator_quant: Quant = Field(
        default=DEFAULT_QUANT, description=f"llama_cpp: the GGUF precision a fine-tuned generator is converted to: "
        f"{', '.join(QUANTS)} (a .gguf given as generator is used as it is)")
    max_new_tokens: int = Field(default=96, ge=1, le=1024, description="Most tokens in a generated reply")
    generation_timeout_s: float = Field(default=30.0, gt=0, le=600, description="A generated reply stops after "
                                        "this many seconds from its arrival at the generator (finish_reason timeout)")
    generation_batch_size: int = Field(default=8, ge=1, le=64, description="Most requests decoded together")
    data: str | None = Field(default=None, description="Prepared data folder: calibrates, on its validation split, "
                             "a version that has no calibration.json")
    target_precision: float = Field(default=0.9, gt=0, le=1, description="Precision the automatic answers must "
                                    "reach when calibrating here")
    default_threshold: float = Field(default=0.5, ge=0, le=1, description="Hand-off threshold of a version with "
                                     "no calibration.json when no data folder is given")
    playbook: str | None = Field(default=None, description="Playbook YAML (default: playbook.yaml in the model "
                                 "folder or in its training data's source folder; else generated replies)")
    threads: int = Field(default=1, ge=1, description="torch (or ONNX Runtime) threads per model replica")
    local_model: bool = Field(default=False, description="The ingress also loads the primary version and answers "
                              "single-text requests from it while it has few queued; other requests, the canary's "
                              "share and the overflow go to the Model deployment")
    max_texts: int = Field(default=64, ge=1, description="Most texts in one /v1/classify or /v1/entities request")
    max_chars: int = Field(default=1000, ge=1, description="Longest text accepted, in characters")
    max_top_k: int = Field(default=5, ge=1, description="Largest top_k a request may ask for")
    retries: int = Field(default=3, ge=0, description="Retries of a model call whose replica died (requests "
                         "are idempotent)")
    model_timeout_s: float = Field(default=8.0, gt=0, le=600, description="A model call (retries included) "
                                   "that has no answer after this many seconds is cancelled and answered with 503 "
                                   "and Retry-After: a slow or stuck replica never makes a request hang")
    routing: RoutingKnobs = Field(default_factory=RoutingKnobs, description="Initial ingress knobs "
                                  "(a user_config in the Serve YAML replaces them)")
    batching: BatchKnobs = Field(default_factory=BatchKnobs, description="Initial knobs of every model "
                                 "deployment (a user_config in the Serve YAML replaces them)")
    api_token: SecretStr | None = Field(default=None, description="Bearer token for /v1 routes; prefer the "
                                        "SLIMRAY_API_TOKEN setting (flags show in the process list, YAML in git)")

    @model_validator(mode="after")
    def _some_model(self) -> "AppArgs":
        if self.model is None and self.entity_model is None and self.sentiment_model is None and self.index is None:
            raise ValueError("give model (an intent classifier), entity_model (an entity tagger), sentiment_model "
                             "(a sentiment classifier for the monitor), index (a knowledge index), or several")
        if self.generator is not None and self.index is None:
            raise ValueError("generator answers from the knowledge index: give index too")
        if self.canary_model is not None and self.model is None:
            raise ValueError("canary_model is a second version of the intent model: give model too")
        return self


@dataclass(frozen=True)
class Version:
    """One served model version: what the ingress routes to and ``/v1/models`` describes."""

    version: str  # its name in answers (model_version, x-model-version)
    role: Literal["primary", "canary", "entity", "sentiment"]
    model_dir: str  # absolute path of the model artifact
    calibration: dict[str, Any]  # "threshold" and "source"; precision, coverage, n... when calibrated; {} for
    # the entity model (it hands nothing off)

    @property
    def threshold(self) -> float:
        """The calibrated hand-off threshold."""
        return self.calibration["threshold"]


class BatchedModel:
    """What the model deployments share: the artifact loaded once per replica, live batch knobs, and requests
    cut into chunks of at most ``max_batch_size`` texts that a ``Batcher`` merges across requests into one
    forward pass (``_run``, on a worker thread) with whatever queued during the previous one."""

    def __init__(self, version: Version, threads: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its thread pool fights torch's
        from ray.serve.metrics import Histogram

        from jobs.inference import load_inference_model

        self.model = load_inference_model(version.model_dir, threads=threads)
        self.version, self.threads = version.version, threads
        self.labels = np.array(self.model.labels, dtype=object)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.knobs = BatchKnobs()
        sizes = Histogram("slimray_batch_texts", description="Texts per forward pass of a model replica",
                          boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.batcher = Batcher(self._run, self.knobs.max_batch_size, self.knobs.batch_wait_timeout_s,
                               on_batch=sizes.observe)
        self._run(["warm-up"])  # first forward allocates; keep it off the first request

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.knobs = BatchKnobs.model_validate(user_config or {})
        self.batcher.configure(self.knobs.max_batch_size, self.knobs.batch_wait_timeout_s)

    async def _answer(self, texts: list[str]) -> tuple[list[Any], str, dict[str, float]]:
        """``_run``'s answer per text, in order, through the batcher; this replica's id; and where the time
        went in this replica (``queue_ms`` waiting for a batch, ``forward_ms`` in its forward pass, ``batch``
        texts in that forward; the slowest chunk's when the request was split; ``model_ms`` in all)."""
        t_in = time.perf_counter()
        size = self.knobs.max_batch_size
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        parts = await asyncio.gather(*(self.batcher.submit(chunk) for chunk in chunks))
        last = max(parts, key=lambda part: part.started + part.forward_s)
        timing = {"queue_ms": (last.started - t_in) * 1000, "forward_ms": last.forward_s * 1000,
                  "batch": last.batch, "model_ms": (time.perf_counter() - t_in) * 1000}
        return [row for part in parts for row in part.rows], self.replica, timing

    def _run(self, texts: list[str]) -> list[Any]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"backend": self.model.backend, "labels": len(self.labels),
                "max_length": self.model.max_length, "threads": self.threads, "replica": self.replica,
                "batching": self.knobs.model_dump()}


@serve.deployment  # named MODEL or CANARY by build_app
class ModelServer(BatchedModel):
    """One intent model version: top labels with probabilities per text."""

    def __init__(self, version: Version, threads: int, max_top_k: int):
        self.max_top_k = max_top_k
        BatchedModel.__init__(self, version, threads)

    async def classify(self, texts: list[str]) -> tuple[list[list[tuple[str, float]]], str, dict[str, float]]:
        """Top labels with probabilities per text, best first; this replica's id; its timing (``_answer``)."""
        return await self._answer(texts)

    def _run(self, texts: list[str]) -> list[list[tuple[str, float]]]:
        return top_labels(self.model, self.labels, texts, self.max_top_k)


def top_labels(model: Any, labels: np.ndarray, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per text, the ``k`` most likely labels with their probabilities, best first."""
    from jobs.inference import softmax

    # Texts of similar token length share a forward: a padded batch of mixed lengths costs about as much as its
    # single forwards on this CPU, so padding would eat what batching saves.
    probs = softmax(model.logits(texts, batch_size=len(texts), by_length=True))  # (B, labels)
    idx = np.argsort(-probs, axis=1)[:, :k]  # (B, k)
    return [list(zip(labels[row].tolist(), probs[i, row].astype(float).tolist())) for i, row in enumerate(idx)]


@serve.deployment(name=ENTITY)
class EntityServer(BatchedModel):
    """The entity tagger: per text, its entities with character offsets (``InferenceModel.entities``)."""

    async def entities(self, texts: list[str]) -> tuple[list[list[dict[str, Any]]], str, dict[str, float]]:
        """Entities per text, in order of appearance; this replica's id; its timing (``_answer``)."""
        return await self._answer(texts)

    def _run(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        return self.model.entities(texts, batch_size=len(texts))


@serve.deployment(name=SENTIMENT)
class SentimentServer(BatchedModel):
    """The sentiment classifier of the monitor: per text, its most likely label and that label's probability."""

    async def score(self, texts: list[str]) -> tuple[list[tuple[str, float]], str, dict[str, float]]:
        return await self._answer(texts)

    def _run(self, texts: list[str]) -> list[tuple[str, float]]:
        from jobs.inference import softmax

        probs = softmax(self.model.logits(texts, batch_size=len(texts), by_length=True))
        best = probs.argmax(axis=1)
        return [(str(self.labels[k]), float(probs[i, k])) for i, k in enumerate(best)]


@dataclass(frozen=True)
class CallPolicy:
    """How the ingress and the monitor call a model deployment: retries of a dead replica, and a deadline."""

    retries: int = 3
    timeout_s: float = 8.0


@serve.deployment(name=MONITOR)
class MonitorServer:
    """The news-sentiment monitor: scores observations with the sentiment model and keeps them, and the alerts
    they raise, in the store (``jobs.monitor``). Replicas share nothing but the store."""

    def __init__(self, sentiment: DeploymentHandle, version: Version, store_url: str, policy: CallPolicy):
        from jobs.monitor import MonitorStore

        self.sentiment, self.version, self.policy = sentiment, version, policy
        self.store = MonitorStore.open(store_url)
        self.rule = AlertRule()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        rule = AlertRule.model_validate(user_config or {})
        if rule != self.rule:
            self.rule = rule
            self.store.recompute(rule)  # the stored texts, judged by the new rule

    async def observe(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Scores and stores ``items`` ({id, topic, text, time: datetime | None}) in one transaction; per item
        its status (stored / duplicate / conflict), label and score."""
        from datetime import datetime, timezone

        from jobs.monitor import Observation

        scores, _, _ = await _call_with_retries(self.sentiment, "score", self.version.version,
                                                [it["text"] for it in items], self.policy)
        arrival = datetime.now(timezone.utc)
        observations = [Observation(id=it["id"], topic=it["topic"], text=it["text"], time=it["time"] or arrival,
                                    label=label, score=score, model_version=self.version.version,
                                    time_given=it["time"] is not None)
                        for it, (label, score) in zip(items, scores)]
        statuses = await asyncio.to_thread(self.store.add, observations, self.rule)
        return [{"id": o.id, "status": status, "label": o.label, "score": o.score}
                for o, status in zip(observations, statuses)]

    async def alerts(self, topic: str | None, since: Any) -> list[dict[str, Any]]:
        """The alerts, each with its example texts (the evidence a reader checks)."""
        def read() -> list[dict[str, Any]]:
            alerts = self.store.alerts(self.rule, topic, since)
            texts = self.store.texts([i for a in alerts for i in a["example_ids"]])
            return [{**a, "examples": [{"id": i, "text": texts[i]} for i in a["example_ids"] if i in texts]}
                    for a in alerts]
        return await asyncio.to_thread(read)

    async def trend(self, topic: str, bucket: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.store.trend, topic, bucket)

    async def topics(self, bucket: str) -> list[dict[str, Any]]:
        """Every topic with its latest bucket's counts per label."""
        def read() -> list[dict[str, Any]]:
            return [{"topic": t, **self.store.trend(t, bucket)[-1]} for t in self.store.topics()]
        return await asyncio.to_thread(read)

    def info(self) -> dict[str, Any]:
        from jobs.monitor import _safe

        return {"store": _safe(self.store.url), "alerting": self.rule.model_dump()}


async def _call_with_policy(method: Any, args: tuple, what: str, policy: CallPolicy) -> Any:
    """``method.remote(*args)`` (a deployment handle's method), retried with backoff while its replica is dead
    (every call here is idempotent: a model's, or the monitor's, which stores an id once).

    Raises ``ModelUnavailable`` (answered with 503 and Retry-After) when the retries are spent, when the
    deployment's queue is full (Serve's ``max_queued_requests``: load is shed, not queued without bound), or when
    no answer came within ``policy.timeout_s`` (the call is then cancelled)."""
    import ray.exceptions
    from ray.serve.exceptions import BackPressureError

    error: Exception | None = None
    deadline = time.monotonic() + policy.timeout_s
    for attempt in range(policy.retries + 1):
        response = method.remote(*args)
        try:
            return await asyncio.wait_for(response, max(0.0, deadline - time.monotonic()))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            error = e
            log.warning("%s: replica failed (attempt %d): %s", what, attempt + 1, type(e).__name__)
            await asyncio.sleep(min(0.1 * 2 ** attempt, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            response.cancel()
            raise ModelUnavailable(f"{what}: no answer within {policy.timeout_s:g} s") from None
        except BackPressureError:
            raise ModelUnavailable(f"{what}: overloaded (its request queue is full)") from None
    raise ModelUnavailable(f"{what}: {type(error).__name__}")


async def _call_with_retries(handle: DeploymentHandle, method: str, version: str, texts: list[str],
                             policy: CallPolicy) -> Any:
    """A model version's ``method(texts)`` under ``policy`` (``_call_with_policy``), with the hop's cost added to
    its timing: what the call cost beyond the replica's own time (routing, both ways of gRPC, pickling)."""
    t0 = time.perf_counter()
    rows, replica, timing = await _call_with_policy(getattr(handle, method), (texts,), version, policy)
    timing["hop_ms"] = (time.perf_counter() - t0) * 1000 - timing["model_ms"]
    return rows, replica, timing


def rebindable_direct_ingress() -> bool:
    """Makes this replica's direct-ingress HTTP server bind its port with SO_REUSEADDR, as uvicorn and every other
    HTTP server do; returns whether it patched (once per process).

    Ray 2.60 binds the direct-ingress port without it (``replica.py``: ``enable_so_reuseport=False``). After an
    ingress replica dies, its connections linger on the port (FIN_WAIT / TIME_WAIT, up to a minute), so its
    replacement's bind fails, Serve marks the port "blocked" for good, and with the one port `slimray serve`
    gives it the endpoint never answers again (found by ``bench/chaos.py``: the ingress replica SIGKILLed under
    load). Called in the ingress replica before Serve starts its server; Serve's own option sets
    SO_REUSEADDR and SO_REUSEPORT, and a port is handed to one replica at a time (``direct_ingress_env``)."""
    from ray.serve._private import replica

    original = replica.start_asgi_http_server
    if getattr(original, "rebindable", False):
        return False

    async def start_asgi_http_server(app: Any, http_options: Any, *, event_loop: Any,
                                     enable_so_reuseport: bool = False) -> Any:
        return await original(app, http_options, event_loop=event_loop, enable_so_reuseport=True)

    start_asgi_http_server.rebindable = True  # type: ignore[attr-defined]
    replica.start_asgi_http_server = start_asgi_http_server
    return True


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    """HTTP ingress and assistant: routes each request to a version, then applies the playbook."""

    def __init__(self, primary: DeploymentHandle | None, canary: DeploymentHandle | None, versions: list[Version],
                 entity: DeploymentHandle | None, entity_version: Version | None, playbook: Playbook,
                 playbook_source: str, limits: Limits, policy: CallPolicy, api_token: str | None,
                 monitor: DeploymentHandle | None = None, sentiment_version: Version | None = None,
                 local_model: bool = False, threads: int = 1, retriever: DeploymentHandle | None = None,
                 generator: DeploymentHandle | None = None):
        from ray.serve.metrics import Counter

        rebindable_direct_ingress()  # before Serve starts this replica's direct-ingress server (if it has one)
        self.handles = [h for h in (primary, canary) if h is not None]
        self.versions, self.policy = versions, policy
        self.entity, self.entity_version = entity, entity_version
        self.monitor, self.sentiment_version = monitor, sentiment_version
        self.retriever, self.generator = retriever, generator
        self.local: Batcher | None = None
        if local_model and versions:  # the primary, in this process too, for single messages
            from jobs.inference import load_inference_model

            model = load_inference_model(versions[0].model_dir, threads=threads)
            labels = np.array(model.labels, dtype=object)
            self.local = Batcher(lambda texts: top_labels(model, labels, texts, limits.max_top_k),
                                 max_batch_size=LOCAL_QUEUE)
            self.local.run(["warm-up"])
        self.playbook, self.playbook_source = playbook, playbook_source
        self.limits = limits
        self.api_token = api_token
        self.knobs = RoutingKnobs()
        # Requests for the primary version, coalesced into calls to its deployment (``model_calls_in_flight``).
        self.dispatch = Batcher(self._classify_primary, max_batch_size=limits.max_texts,
                                concurrency=max(1, self.knobs.model_calls_in_flight))
        self.intents = Counter("slimray_intents", description="Assist answers per intent and model version",
                               tag_keys=("intent", "model_version"))
        self.handoffs = Counter("slimray_handoffs", description="Hand-offs to a human per reason and model version",
                                tag_keys=("reason", "model_version"))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.knobs = RoutingKnobs.model_validate(user_config or {})
        self.dispatch.configure(self.limits.max_texts, 0.0, max(1, self.knobs.model_calls_in_flight))

    def __serve_build_asgi_app__(self):
        return make_api(self, self.playbook, self.limits, self.api_token, self._count, intents=bool(self.handles),
                        entities=self.entity is not None, monitor=self.monitor is not None,
                        search=self.retriever is not None, generate=self.generator is not None)

    def _count(self, decision: Decision, version: str) -> None:
        self.intents.inc(tags={"intent": decision.intent, "model_version": version})
        if decision.handoff:
            self.handoffs.inc(tags={"reason": decision.handoff_reason or "", "model_version": version})

    def _threshold(self, version: Version) -> float:
        """The hand-off threshold in force: the live override, else the version's calibration."""
        override = self.knobs.handoff_threshold
        return version.threshold if override is None else override

    async def _call(self, handle: DeploymentHandle, method: str, version: str, texts: list[str]) -> Any:
        return await _call_with_retries(handle, method, version, texts, self.policy)

    async def classify(self, texts: list[str]) -> Classification:
        """Backend.classify: picks the version (canary split), calls it, retries if its replica died."""
        i = 1 if len(self.handles) > 1 and random.random() < self.knobs.canary_fraction else 0
        version = self.versions[i]
        if i == 0 and self.local is not None and len(texts) == 1 and self.local.queued_texts < LOCAL_QUEUE:
            t0 = time.perf_counter()
            result = await self.local.submit(texts)
            timing = {"hop_ms": 0.0, "queue_ms": (result.started - t0) * 1000, "forward_ms": result.forward_s * 1000,
                      "batch": result.batch}
            return Classification(version=version.version, threshold=self._threshold(version), top=result.rows,
                                  replica="ingress", timing=timing)
        if i == 0 and self.knobs.model_calls_in_flight:
            t0 = time.perf_counter()
            result = await self.dispatch.submit(texts)
            replica, timing = result.rows[0][1], dict(result.rows[0][2])
            timing["queue_ms"] += (result.started - t0) * 1000  # waiting here for a call, then in the replica
            return Classification(version=version.version, threshold=self._threshold(version),
                                  top=[row[0] for row in result.rows], replica=replica, timing=timing)
        top, replica, timing = await self._call(self.handles[i], "classify", version.version, texts)
        return Classification(version=version.version, threshold=self._threshold(version), top=top, replica=replica,
                              timing=timing)

    async def _classify_primary(self, texts: list[str]) -> list[tuple[list[tuple[str, float]], str, dict]]:
        """One call to the primary's deployment for the texts of several requests (``self.dispatch``): per
        text, its top labels with the replica and timing of the call."""
        top, replica, timing = await self._call(self.handles[0], "classify", self.versions[0].version, texts)
        return [(row, replica, timing) for row in top]

    async def entities(self, texts: list[str]) -> Tagging:
        """Backend.entities: the entity model's spans per text, retried if its replica died."""
        assert self.entity is not None and self.entity_version is not None  # the route exists only then
        found, replica, timing = await self._call(self.entity, "entities", self.entity_version.version, texts)
        return Tagging(version=self.entity_version.version, entities=found, replica=replica, timing=timing)

    async def observe(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Backend.observe: the monitor scores and stores the items."""
        assert self.monitor is not None  # the route exists only then
        return await _call_with_policy(self.monitor.observe, (items,), "monitor", self.policy)

    async def alerts(self, topic: str | None, since: Any) -> list[dict[str, Any]]:
        assert self.monitor is not None
        return await self.monitor.alerts.remote(topic, since)

    async def trend(self, topic: str, bucket: str) -> list[dict[str, Any]]:
        assert self.monitor is not None
        return await self.monitor.trend.remote(topic, bucket)

    async def topics(self, bucket: str) -> list[dict[str, Any]]:
        assert self.monitor is not None
        return await self.monitor.topics.remote(bucket)

    async def search(self, query: str, k: int) -> Search:
        """Backend.search: the retriever's k best passages."""
        assert self.retriever is not None  # the route exists only then
        found = await self.retriever.search.remote(query, k)
        return Search(found["hits"], found["min_score"], found["replica"], found["timing"])

    async def compose(self, question: str, passages: list[dict[str, Any]]) -> dict[str, Any]:
        """Backend.compose: the generator's answer from the passages."""
        assert self.generator is not None
        return await self.generator.generate.remote(question, passages)

    def compose_stream(self, question: str, passages: list[dict[str, Any]]) -> Any:
        """Backend.compose_stream: text pieces as they are decoded, then the final answer (dict)."""
        assert self.generator is not None
        return self.generator.options(stream=True).stream.remote(question, passages)

    async def describe(self) -> dict[str, Any]:
        """Backend.describe: every version with its live state, the routing knobs and the playbook."""
        handles = self.handles + ([self.entity] if self.entity is not None else [])
        infos = await asyncio.gather(*(h.info.remote() for h in handles))
        fractions = [1.0] if len(self.handles) == 1 else [1 - self.knobs.canary_fraction, self.knobs.canary_fraction]
        entity = None
        if self.entity_version is not None:
            entity = {**asdict(self.entity_version), **infos[-1]}
            entity.pop("calibration")
        return {
            "versions": [{**asdict(v), **info, "traffic_fraction": f, "handoff_threshold": self._threshold(v)}
                         for v, info, f in zip(self.versions, infos, fractions)],
            "entity_model": entity,
            "sentiment_model": (None if self.monitor is None else
                                {**{k: v for k, v in asdict(self.sentiment_version).items() if k != "calibration"},
                                 **(await self.monitor.info.remote())}),
            "knowledge": None if self.retriever is None else await self.retriever.info.remote(),
            "generator": None if self.generator is None else await self.generator.info.remote(),
            "routing": self.knobs.model_dump(),
            "playbook": {"source": self.playbook_source, "intents": sorted(self.playbook.intents)},
            "limits": vars(self.limits),
            "auth": self.api_token is not None,
        }


def resolve_calibration(model_dir: str, data: str | None, target_precision: float,
                        default_threshold: float) -> dict[str, Any]:
    """The version's stored calibration, else one computed on ``data``'s validation split, else the default;
    ``source`` says which."""
    from jobs.calibration import CALIBRATION_FILE, calibrate_handoff, read_calibration

    stored = read_calibration(model_dir)
    if stored is not None:
        return {**stored, "source": f"stored ({CALIBRATION_FILE})"}
    if data:
        from jobs.inference import load_inference_model

        calibration = calibrate_handoff(load_inference_model(model_dir, script=False), data, target_precision)
        log.info("calibrated %s on %s: threshold %.3f (coverage %.3f)", model_dir, data,
                 calibration["threshold"], calibration["coverage"])
        return {**calibration, "source": "computed at start-up (validation split)"}
    return {"threshold": default_threshold, "source": "default (no calibration.json, no data folder)"}


def _local(path: str | None) -> str | None:
    """An absolute local path (Serve may build the app in another working directory); a URI as given."""
    return path if path is None or "://" in path else str(Path(path).expanduser().resolve())


def _folders(args: AppArgs) -> list[tuple[Literal["primary", "canary", "entity", "sentiment"], str, str]]:
    """(role, model folder, version name) of each version to serve."""
    out: list[tuple[Literal["primary", "canary", "entity", "sentiment"], str, str]] = []
    for role, folder, name in (("primary", args.model, args.version),
                               ("canary", args.canary_model, args.canary_version),
                               ("entity", args.entity_model, args.entity_version),
                               ("sentiment", args.sentiment_model, args.sentiment_version)):
        if folder:
            out.append((role, folder, name or Path(folder).name))
    return out


def _tagger_types(folder: str) -> set[str] | None:
    """The entity types of a model folder's tagger (``B-X`` / ``I-X`` labels of its config), or None when the
    folder holds no tagger (a classifier, or no readable config.json)."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        return None
    meta = json.loads(config.read_text())
    if not is_tagger(meta.get("architectures")):
        return None
    return {label.split("-", 1)[1] for label in (meta.get("id2label") or {}).values() if "-" in label}


def resolve_paths(args: AppArgs) -> AppArgs:
    """``args`` with absolute paths, once each model folder is known to exist and hold the kind of model its
    role serves, and the intent versions' names differ: the mistakes worth a one-line error before Serve
    starts (``serve_app.run.deploy`` checks them first)."""
    for role, folder, _ in _folders(args):
        if not Path(folder).expanduser().is_dir():
            raise InputError(f"{role} model folder {folder!r} does not exist")
    for role, folder, _ in _folders(args):
        check_model_folder(Path(folder).expanduser())  # damaged or incomplete: one line, before Serve starts
        tagger = _tagger_types(folder) is not None
        if role != "entity" and tagger:
            raise InputError(f"{role} model {folder!r} is an entity tagger: serve it as entity_model "
                             "(--entity-model)")
        if role == "entity" and not tagger:
            raise InputError(f"entity model {folder!r} is not an entity tagger (a --task ner fine-tune or "
                             "compression); serve a classifier as model (--model)")
    if args.index is not None and not (Path(args.index).expanduser() / "index.json").is_file():
        raise InputError(f"index {args.index!r} is not a knowledge index (no index.json); build one with "
                         "`slimray index --docs FOLDER --out DIR`")
    if args.generator is not None:
        from jobs.generation import causal_lm_source

        causal_lm_source(args.generator)  # a packaged name, or an existing model folder
        if args.generator_backend == "llama_cpp":
            from jobs.llamacpp import require_llama_cpp

            require_llama_cpp()
    args = args.model_copy(update={key: _local(getattr(args, key)) for key in
                                   ("model", "canary_model", "entity_model", "sentiment_model", "data", "playbook",
                                    "index")})
    if args.generator is not None and Path(args.generator).expanduser().exists():
        args = args.model_copy(update={"generator": _local(args.generator)})
    if args.sentiment_model:
        args = args.model_copy(update={"monitor_store": monitor_store_url(args.monitor_store)})
    names = [name for role, _, name in _folders(args) if role in ("primary", "canary")]
    if len(set(names)) < len(names):
        raise InputError(f"primary and canary are both called {names[0]!r}: set version or canary_version")
    return args


def monitor_store_url(url: str | None) -> str:
    """The monitor's store URL: ``url``, with a relative SQLite path made absolute; by default the SQLite file
    ``<storage_root>/monitor/monitor.db``."""
    if url is None:
        return f"sqlite:///{(Path(get_settings().storage_root) / 'monitor' / 'monitor.db').expanduser().resolve()}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{Path(url.removeprefix('sqlite:///')).expanduser().resolve()}"
    return url


def resolve_playbook(args: AppArgs) -> tuple[Playbook, str]:
    """The playbook and where it came from; its slots must ask for entity types the entity model tags."""
    if args.model is None:
        return Playbook(), "none (no intent model: /v1/assist is not served)"
    path = args.playbook or find_playbook(args.model)
    playbook = load_playbook(path) if path else Playbook()
    wanted = slot_types(playbook)
    if wanted and args.entity_model is None:
        log.warning("playbook %s fills slots from entity types %s, but no entity model is served: those slots "
                    "stay empty (or take the request's values)", path, sorted(wanted))
    elif wanted:
        tagged = _tagger_types(args.entity_model) or set()
        if wanted - tagged:
            raise InputError(f"playbook {path} fills slots from entity types {sorted(wanted - tagged)} that the "
                             f"entity model {args.entity_model!r} does not tag (it tags {sorted(tagged)})")
    return playbook, str(path) if path else "generated (no playbook found)"


def build_app(args: AppArgs) -> Application:
    """The Serve application: Ingress bound to one model deployment per intent version and one for the
    entity model.

    ``serve deploy`` validates the YAML's ``args`` into ``AppArgs`` through this annotation (keep it a
    real class: no ``from __future__ import annotations`` in this module). Deployment options come from
    the Serve config, applied by Serve; here only each deployment's name and initial knobs are set.
    """
    args = resolve_paths(args)
    playbook, playbook_source = resolve_playbook(args)
    versions, entity, sentiment = [], None, None
    for role, folder, name in _folders(args):
        if role == "entity":
            entity = Version(name, role, folder, {})
        elif role == "sentiment":
            sentiment = Version(name, role, folder, {})
        else:
            versions.append(Version(name, role, folder, resolve_calibration(
                folder, args.data, args.target_precision, args.default_threshold)))
    knobs = args.batching.model_dump()
    models = [ModelServer.options(name=name, user_config=knobs).bind(version, args.threads, args.max_top_k)
              for name, version in zip((MODEL, CANARY), versions)]
    tagger = EntityServer.options(user_config=knobs).bind(entity, args.threads) if entity else None
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, max_top_k=args.max_top_k)
    policy = CallPolicy(args.retries, args.model_timeout_s)
    secret = args.api_token or get_settings().api_token  # read where Serve builds the app: on the cluster
    token = (secret.get_secret_value() if secret else "") or None  # empty: no auth (not an empty password)
    monitor = None
    if sentiment is not None:
        scorer = SentimentServer.options(user_config=knobs).bind(sentiment, args.threads)
        monitor = MonitorServer.options(user_config=args.alerting.model_dump()).bind(
            scorer, sentiment, args.monitor_store, policy)
    retriever = RetrieverServer.bind(args.index, args.threads) if args.index else None
    generator = None
    if args.generator:
        gguf_file = None
        if args.generator_backend == "llama_cpp":  # converted here, once: replicas load the cached file
            from cluster import storage
            from jobs.llamacpp import gguf_for

            gguf_file = str(gguf_for(args.generator, storage.cache_root() / "gguf", args.generator_quant))
        generator = GeneratorServer.bind(args.generator, args.threads, GenerationLimits(
            args.max_new_tokens, args.generation_timeout_s, args.generation_batch_size), args.generator_backend,
            gguf_file, args.generator_dtype)
    return Ingress.options(user_config=args.routing.model_dump()).bind(
        models[0] if models else None, models[1] if len(models) > 1 else None, versions, tagger, entity,
        playbook, playbook_source, limits, policy, token, monitor, sentiment, args.local_model, args.threads,
        retriever, generator)
