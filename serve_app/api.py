"""The HTTP API: request and response schemas, validation, auth and routes, built by ``make_api``.

``make_api`` takes the model side as a ``Backend`` (the Serve ingress passes one that calls the model
deployments through handles; unit tests pass an in-process one), so the API is tested without Ray.

    POST /v1/classify  {"texts": [...], "top_k": 3}      -> label, score and top-k per text
    POST /v1/assist    {"message": "...", "slots": {...}} -> intent, confidence, reply, handoff, entities
    POST /v1/entities  {"texts": [...]}                   -> entities with character offsets per text
    POST /v1/search    {"query": "...", "k": 3}           -> passages of the knowledge index, with scores
    POST /v1/assist?stream=true                           -> server-sent events: token {"text"}..., done {answer}
    GET  /v1/models    versions, traffic, calibration, playbook      GET /healthz     OpenAPI at /docs

Routes exist for the models served: /v1/classify and /v1/assist with an intent model, /v1/entities with an
entity model (and /v1/assist then carries the message's entities and fills the playbook's entity slots),
/v1/search with a knowledge index; with a generator too, /v1/assist answers a message the playbook does not
cover (confidence below the hand-off threshold, or an intent whose playbook entry says ``search: true``) from
the passages the search finds, citing them, and hands off when none scores above the index's calibrated
threshold.

Every client error is a 4xx JSON ``{"error": ..., "details": [{"field": ..., "message": ...}]}``; the
details never echo the request's text. Request texts are never logged.
"""

# No `from __future__ import annotations`: FastAPI must see the request classes that make_api defines
# locally, not their names.
import asyncio
import functools
import hmac
import importlib.resources
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Callable, Literal, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints
from starlette.exceptions import HTTPException

from serve_app.assistant import Decision, Playbook, decide


@dataclass(frozen=True)
class Limits:
    """Request limits; they appear in the OpenAPI schema too."""

    max_texts: int = 64
    max_chars: int = 1000
    max_top_k: int = 5
    max_slots: int = 8


@dataclass
class Classification:
    """One model version's answer: per text, the top labels with probabilities, best first."""

    version: str
    threshold: float  # the hand-off threshold in force for this version
    top: list[list[tuple[str, float]]]
    replica: str = ""
    timing: dict[str, float] = field(default_factory=dict)  # SERVER_TIMING keys, where the time went


@dataclass
class Tagging:
    """The entity model's answer: per text, its entities (``jobs.tagging.char_spans``)."""

    version: str
    entities: list[list[dict[str, Any]]]
    replica: str = ""
    timing: dict[str, float] = field(default_factory=dict)  # SERVER_TIMING keys, where the time went


# Where a request's time went, answered in a ``Server-Timing`` header (W3C): ``ingress`` is the ingress app from
# request to response head; ``hop`` the handle call to the model replica beyond the replica's own time;
# ``queue`` waiting there for a batch; ``forward`` that batch's forward pass, of ``batch`` texts (its desc).
SERVER_TIMING = {"hop_ms": "hop", "queue_ms": "queue", "forward_ms": "forward"}


def server_timing(timing: dict[str, float]) -> str:
    """The ``Server-Timing`` value of a model answer's timing (``SERVER_TIMING``)."""
    parts = [f"{name};dur={timing[key]:.2f}" for key, name in SERVER_TIMING.items() if key in timing]
    if "batch" in timing:
        parts.append(f'batch;desc="{int(timing["batch"])}"')
    return ", ".join(parts)


def parse_server_timing(value: str) -> dict[str, float]:
    """``{name: dur}`` (``batch``: its desc) of a ``Server-Timing`` value; the benchmarks read it."""
    out = {}
    for part in value.split(","):
        name, *params = [p.strip() for p in part.split(";")]
        for param in params:
            key, _, val = param.partition("=")
            if key in ("dur", "desc") and name:
                try:
                    out[name] = float(val.strip('"'))
                except ValueError:  # a desc that is not a number (another server's metric)
                    pass
    return out


class IngressTiming:
    """ASGI middleware: adds ``ingress;dur=`` (request in to response head out, body parsing, validation,
    the model call and the assistant included) to the ``Server-Timing`` header of every HTTP answer."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                own = f"ingress;dur={(time.perf_counter() - t0) * 1000:.2f}".encode()
                for i, (key, value) in enumerate(headers):
                    if key.lower() == b"server-timing":
                        headers[i] = (key, value + b", " + own)
                        break
                else:
                    headers.append((b"server-timing", own))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


class BodyLimit:
    """ASGI middleware: a request body over ``limit_for(path)`` bytes is answered with 413 before it is read
    (by its Content-Length) or as soon as a streamed one passes the limit, so an oversized body costs neither the
    memory to hold it nor the time to parse it. The limits are those of the largest valid request (``body_limit``)."""

    def __init__(self, app: Any, limit_for: Callable[[str], int]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = _error(413, f"request body of {int(length)} bytes is over the limit of {limit}")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, limited, send)


def body_limit(limits: Limits, path: str) -> int:
    """The largest body a valid request to ``path`` can have, in bytes: every character escaped in JSON (6 bytes
    each, as in \\u00e9) plus room for the keys; the monitor's batch of observations has its own."""
    if path.startswith("/v1/observations"):
        chars = MAX_OBSERVATIONS * (MAX_OBSERVATION_CHARS + 3 * 200 + 64)
    else:
        chars = limits.max_texts * limits.max_chars + limits.max_slots * 200 + 4096
    return 6 * chars + 65536


@dataclass(frozen=True)
class Search:
    hits: list[dict[str, Any]]  # id, title, text, doc, score; best first
    min_score: float  # the index's no-relevant-passage threshold
    replica: str = ""
    timing: dict[str, float] = field(default_factory=dict)


class ModelUnavailable(RuntimeError):
    """No model replica answered in time (answered with 503)."""


class Backend(Protocol):
    """The model side as the API sees it."""

    async def classify(self, texts: list[str]) -> Classification: ...

    async def entities(self, texts: list[str]) -> Tagging: ...

    async def describe(self) -> dict[str, Any]: ...

    async def observe(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    async def alerts(self, topic: str | None, since: datetime | None) -> list[dict[str, Any]]: ...

    async def trend(self, topic: str, bucket: str) -> list[dict[str, Any]]: ...

    async def topics(self, bucket: str) -> list[dict[str, Any]]: ...

    async def search(self, query: str, k: int) -> Search: ...

    async def compose(self, question: str, passages: list[dict[str, Any]]) -> dict[str, Any]: ...

    def compose_stream(self, question: str, passages: list[dict[str, Any]]) -> Any: ...


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it holds a lone surrogate)") from None
    return text


def _well_formed(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or whitespace only")
    return _valid_unicode(text)


class Scored(BaseModel):
    label: str = Field(description="Intent label")
    score: float = Field(description="Probability, 0-1")


class TextResult(BaseModel):
    label: str = Field(description="Most likely label")
    score: float = Field(description="Its probability, 0-1")
    top_k: list[Scored] = Field(description="The top_k labels, best first")


class ClassifyResponse(BaseModel):
    model_version: str = Field(description="Model version that answered")
    results: list[TextResult] = Field(description="One result per input text, in order")


class Entity(BaseModel):
    start: int = Field(description="Offset of its first character in the text")
    end: int = Field(description="Offset after its last character: text[start:end] == text")
    type: str = Field(description="Entity type")
    text: str = Field(description="The entity as written")
    score: float = Field(description="Mean probability of its words' tags, 0-1")


class EntitiesResult(BaseModel):
    entities: list[Entity] = Field(description="Entities in order of appearance")


class EntitiesResponse(BaseModel):
    model_version: str = Field(description="Entity model version that answered")
    results: list[EntitiesResult] = Field(description="One result per input text, in order")


class Citation(BaseModel):
    id: str = Field(description="Passage id in the knowledge index")
    title: str = Field(description="Passage title (document and section)")
    score: float = Field(description="Its search score (cosine similarity to the message)")


class Passage(BaseModel):
    id: str
    title: str
    text: str
    doc: str = Field(description="Source document, relative to the indexed folder")
    score: float = Field(description="Cosine similarity to the query")


class SearchResponse(BaseModel):
    results: list[Passage] = Field(description="Best first")
    min_score: float = Field(description="The index's calibrated threshold: below it a passage is not relevant")
    relevant: bool = Field(description="Whether the best passage reaches min_score")


class AssistResponse(BaseModel):
    intent: str = Field(description="Most likely intent")
    confidence: float = Field(description="Its probability, 0-1")
    reply: str = Field(description="Reply for the customer (from the playbook, or generated)")
    handoff: bool = Field(description="Whether a human takes over")
    handoff_reason: Literal["low_confidence", "intent_policy"] | None = Field(
        description="low_confidence: confidence below the threshold (and, with a knowledge index, no relevant "
        "passage); intent_policy: the playbook hands this intent off")
    source: Literal["playbook", "generated", "handoff"] = Field(
        default="playbook", description="playbook: the intent's reply; generated: composed from the cited passages; "
        "handoff: a human takes over")
    citations: list[Citation] = Field(default_factory=list, description="Passages a generated reply is based on")
    finish_reason: Literal["stop", "length", "timeout"] | None = Field(
        default=None, description="Why a generated reply ended (length: the token limit; timeout: the time limit)")
    threshold: float = Field(description="Hand-off threshold in force for this model version")
    alternatives: list[Scored] = Field(description="The top_k intents, best first")
    model_version: str = Field(description="Model version that answered")
    entities: list[Entity] | None = Field(default=None, description="Entities in the message (null when no "
                                          "entity model is served); they fill the playbook's slots")
    entity_model_version: str | None = Field(default=None, description="Entity model version that answered")


class ObservationResult(BaseModel):
    id: str = Field(description="The item's id")
    status: Literal["stored", "duplicate", "conflict"] = Field(
        description="stored; duplicate: this id was stored before with the same content (stored once); conflict: "
                    "this id was stored before with other content (nothing changed)")
    label: str = Field(description="Sentiment label of this text")
    score: float = Field(description="Its probability, 0-1")


class ObservationsResponse(BaseModel):
    results: list[ObservationResult] = Field(description="One result per item, in order")


class Example(BaseModel):
    id: str
    text: str


class Alert(BaseModel):
    topic: str
    window_start: datetime = Field(description="Start of the window that surged (event time, UTC)")
    window_end: datetime
    n: int = Field(description="Texts in the window")
    negative: int = Field(description="Negative texts in the window")
    baseline: float = Field(description="The topic's negative share in the windows before it")
    score: float = Field(description="z-score (or ratio) of the window's negative share against the baseline")
    example_ids: list[str] = Field(description="Ids of the window's most confidently negative texts")
    examples: list[Example] = Field(default_factory=list, description="Those texts, as stored")


class AlertsResponse(BaseModel):
    alerts: list[Alert]


class TrendPoint(BaseModel):
    start: datetime = Field(description="Start of the bucket (UTC)")
    n: int
    negative: int
    neutral: int
    positive: int


class TrendResponse(BaseModel):
    points: list[TrendPoint] = Field(description="Buckets with texts, oldest first")


class TopicSummary(TrendPoint):
    topic: str
    start: datetime = Field(description="Start of the topic's latest bucket with texts (UTC)")


class TopicsResponse(BaseModel):
    topics: list[TopicSummary] = Field(description="Every topic with texts, and its latest bucket's sentiment mix")


class ErrorDetail(BaseModel):
    field: str = Field(description="Where the problem is, e.g. texts[2]")
    message: str = Field(description="What is wrong")


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong")
    details: list[ErrorDetail] = Field(default_factory=list, description="One entry per bad field")


def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    """The request bodies (classify, assist, entities), with this deployment's limits built into their schema."""
    Text = Annotated[StrictStr, StringConstraints(min_length=1, max_length=limits.max_chars),
                     AfterValidator(_well_formed)]
    TopK = Annotated[StrictInt, Field(ge=1, le=limits.max_top_k, description="How many labels to return")]
    SlotValue = Annotated[StrictStr, StringConstraints(max_length=200), AfterValidator(_valid_unicode)]

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid",
                                  json_schema_extra={"examples": [{"texts": ["my card has not arrived"]}]})

        texts: list[Text] = Field(min_length=1, max_length=limits.max_texts,
                                  description=f"1-{limits.max_texts} texts of up to {limits.max_chars} characters")
        top_k: TopK = 3

    class AssistRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"message": "I lost my card"}]})

        message: Text = Field(description=f"The customer's message, up to {limits.max_chars} characters")
        top_k: TopK = 3
        slots: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")], SlotValue] = Field(
            default_factory=dict, max_length=limits.max_slots,
            description="Values for reply templates, e.g. {\"customer_name\": \"Sam\"}")

    class EntitiesRequest(BaseModel):
        model_config = ConfigDict(extra="forbid",
                                  json_schema_extra={"examples": [{"texts": ["is the Leeds branch open?"]}]})

        texts: list[Text] = Field(min_length=1, max_length=limits.max_texts,
                                  description=f"1-{limits.max_texts} texts of up to {limits.max_chars} characters")

    return ClassifyRequest, AssistRequest, EntitiesRequest


MAX_SEARCH_K = 20


def search_request(limits: Limits) -> type[BaseModel]:
    Text = Annotated[StrictStr, StringConstraints(min_length=1, max_length=limits.max_chars),
                     AfterValidator(_well_formed)]

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "wire abroad fee"}]})

        query: Text = Field(description=f"What to look for, up to {limits.max_chars} characters")
        k: StrictInt = Field(default=3, ge=1, le=MAX_SEARCH_K, description="How many passages")

    return SearchRequest


def needs_documents(playbook: Playbook, decision: Decision) -> bool:
    """Whether a decision should be answered from the knowledge base: its confidence was too low for the
    playbook, or its intent's entry asks for a search (e.g. an out-of-scope intent)."""
    entry = playbook.intents.get(decision.intent)
    return decision.handoff_reason == "low_confidence" or (entry is not None and entry.search)


def sse(event: str, data: Any) -> bytes:
    import json

    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


MAX_OBSERVATIONS, MAX_OBSERVATION_CHARS = 1000, 5000


def observations_request() -> type[BaseModel]:
    Name = Annotated[StrictStr, StringConstraints(min_length=1, max_length=200), AfterValidator(_well_formed)]
    Text = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_OBSERVATION_CHARS),
                     AfterValidator(_well_formed)]

    class ObservationItem(BaseModel):
        model_config = ConfigDict(extra="forbid")

        id: Name = Field(description="Your id of the text: the same id twice is stored once")
        topic: Name = Field(description="What the text is about (a company, a product, a market)")
        text: Text = Field(description=f"The text, up to {MAX_OBSERVATION_CHARS} characters")
        time: AwareDatetime | None = Field(default=None, description="Event time, RFC 3339 (default: arrival)")

    class ObservationsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"items": [
            {"id": "n-1", "topic": "acme", "text": "Acme shares slump after the recall", "time": "2026-12-06T09:00:00Z"}]}]})

        items: list[ObservationItem] = Field(min_length=1, max_length=MAX_OBSERVATIONS,
                                             description=f"1-{MAX_OBSERVATIONS} texts to score and keep")

    return ObservationsRequest


def _field(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(body)"


def _validation_details(exc: RequestValidationError) -> list[dict[str, str]]:
    details = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":  # loc is ("body", character offset)
            offset = e.get("loc", (None, "?"))[-1]
            details.append({"field": "(body)", "message": f"malformed JSON at character {offset}: "
                            f"{e.get('ctx', {}).get('error', 'cannot parse')}"})
            continue
        details.append({"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")})
    return details


def _error(status: int, error: str, details: list[dict[str, str]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "details": details or []}, status_code=status, headers=headers)


# The page runs only its own script and talks only to this server: an injected <script> or inline handler
# in a customer message could not run even if it reached the DOM as markup (the page inserts text nodes).
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def make_api(backend: Backend, playbook: Playbook, limits: Limits = Limits(), api_token: str | None = None,
             on_decision: Callable[[Decision, str], None] | None = None, intents: bool = True,
             entities: bool = False, monitor: bool = False, search: bool = False, generate: bool = False) -> FastAPI:
    """The FastAPI app of the assistant.

    Args:
        backend: the model side (classification, entities and a description of the model versions).
        playbook: replies per intent.
        limits: request limits.
        api_token: when set, every /v1 route needs ``Authorization: Bearer <token>`` (401 otherwise).
        on_decision: called with each assist decision and the answering version (metrics counters).
        intents: an intent model is served (/v1/classify, /v1/assist).
        entities: an entity model is served (/v1/entities; entities and slots in /v1/assist).
        monitor: a sentiment model and the monitor are served (/v1/observations, /v1/alerts, trends).
        search: a knowledge index is served (/v1/search).
        generate: a generator is served too: /v1/assist answers from the documents where the playbook cannot.
    """
    ClassifyRequest, AssistRequest, EntitiesRequest = request_models(limits)
    errors = {code: {"model": ErrorResponse, "description": text} for code, text in [
        (400, "Body that is not UTF-8 JSON"), (401, "Missing or wrong bearer token"),
        (413, "Body larger than the largest valid request"),
        (422, "Invalid request: the details name each bad field"), (503, "No model replica could answer")]}
    api = FastAPI(title="slimray assistant", version="1",
                  description="Intent classification, entity tagging and assistant replies, served by Ray Serve.")
    api.add_middleware(IngressTiming)
    api.add_middleware(BodyLimit, limit_for=functools.partial(body_limit, limits))
    bearer = HTTPBearer(auto_error=False, description="Needed when the server has an API token")

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_token is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, api_token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request", _validation_details(exc))

    @api.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        error = "malformed request body: not UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        return _error(exc.status_code, error, headers=getattr(exc, "headers", None))

    @api.exception_handler(ModelUnavailable)
    async def _unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
        return _error(503, f"model unavailable: {exc}", headers={"Retry-After": "1"})

    def tag(response: Response, result: Classification | Tagging) -> None:
        response.headers["x-model-version"] = result.version
        if result.replica:
            response.headers["x-model-replica"] = result.replica
        if result.timing:
            response.headers["server-timing"] = server_timing(result.timing)

    if intents:
        @api.post("/v1/classify", response_model=ClassifyResponse, responses=errors,
                  dependencies=[Depends(authorized)], summary="Label texts: label, score and the top-k labels per text")
        async def classify(body: ClassifyRequest, response: Response) -> ClassifyResponse:
            result = await backend.classify(body.texts)
            tag(response, result)
            return ClassifyResponse(model_version=result.version, results=[
                TextResult(label=top[0][0], score=top[0][1],
                           top_k=[Scored(label=label, score=score) for label, score in top[:body.top_k]])
                for top in result.top])

        streamed = {200: {"content": {"text/event-stream": {"schema": {
            "description": "With ?stream=true: `token` events whose data is {\"text\": ...}, then one `done` event "
            "whose data is the AssistResponse",
            "type": "object", "required": ["event", "data"],
            "properties": {"event": {"enum": ["token", "done"]},
                           "data": {"type": "string", "contentMediaType": "application/json"}}}}}}}

        @api.post("/v1/assist", response_model=AssistResponse, responses={**errors, **streamed},
                  dependencies=[Depends(authorized)],
                  summary="Answer a customer message: intent, reply, and whether a human takes over")
        async def assist(body: AssistRequest, response: Response,
                         stream: Annotated[bool, Query(description="Send server-sent events: `token` events "
                                                       "{text} as the reply is produced, then one `done` event "
                                                       "with the whole answer")] = False) -> Any:
            if entities:  # both models at once: the message waits for the slower of the two, not their sum
                result, found = await asyncio.gather(backend.classify([body.message]),
                                                     backend.entities([body.message]))
            else:
                result, found = await backend.classify([body.message]), None
            tag(response, result)
            top = result.top[0]
            spans = found.entities[0] if found is not None else None
            decision = decide(playbook, top[0][0], top[0][1], result.threshold, body.slots, result.version, spans)
            answer = AssistResponse(
                intent=decision.intent, confidence=decision.confidence, reply=decision.reply,
                handoff=decision.handoff, handoff_reason=decision.handoff_reason, threshold=result.threshold,
                source="handoff" if decision.handoff else "playbook",
                alternatives=[Scored(label=label, score=score) for label, score in top[:body.top_k]],
                model_version=result.version, entities=None if spans is None else [Entity(**e) for e in spans],
                entity_model_version=None if found is None else found.version)
            passages: list[dict[str, Any]] = []
            if generate and needs_documents(playbook, decision):
                searched = await backend.search(body.message, 3)
                # Nothing relevant: the decision stands (a low-confidence message goes to a human, an intent's
                # reply is said) rather than the model inventing an answer.
                passages = [h for h in searched.hits if h["score"] >= searched.min_score]
            if on_decision is not None:
                on_decision(decision, result.version)
            if not passages:
                if not stream:
                    return answer
                events = [sse("token", {"text": answer.reply}), sse("done", answer.model_dump(mode="json"))]
                return StreamingResponse(iter(events), media_type="text/event-stream", headers=dict(response.headers))

            def finish(generated: dict[str, Any]) -> AssistResponse:
                from jobs.generation import citations, strip_citations

                by_id = {p["id"]: p for p in passages}
                cited = [by_id[i] for i in citations(generated["text"]) if i in by_id] or passages[:1]
                answer.reply = strip_citations(generated["text"]) or playbook.default
                answer.handoff, answer.handoff_reason, answer.source = False, None, "generated"
                answer.finish_reason = generated["finish_reason"]
                answer.citations = [Citation(id=p["id"], title=p["title"], score=p["score"]) for p in cited]
                return answer

            if not stream:
                return finish(await backend.compose(body.message, passages))

            async def events():
                async for piece in backend.compose_stream(body.message, passages):
                    if isinstance(piece, dict):
                        yield sse("done", finish(piece).model_dump(mode="json"))
                    elif piece:
                        yield sse("token", {"text": piece})

            return StreamingResponse(events(), media_type="text/event-stream", headers=dict(response.headers))

    if entities:
        @api.post("/v1/entities", response_model=EntitiesResponse, responses=errors,
                  dependencies=[Depends(authorized)],
                  summary="Find entities: type, text, score and character offsets per text")
        async def find_entities(body: EntitiesRequest, response: Response) -> EntitiesResponse:
            result = await backend.entities(body.texts)
            tag(response, result)
            return EntitiesResponse(model_version=result.version, results=[
                EntitiesResult(entities=[Entity(**e) for e in row]) for row in result.entities])

    if monitor:
        ObservationsRequest = observations_request()

        @api.post("/v1/observations", response_model=ObservationsResponse, responses=errors,
                  dependencies=[Depends(authorized)],
                  summary="Score texts about topics and keep them (idempotent per id); alerts follow from them")
        async def observations(body: ObservationsRequest) -> ObservationsResponse:
            items = [item.model_dump() for item in body.items]
            return ObservationsResponse(results=[ObservationResult(**r) for r in await backend.observe(items)])

        @api.get("/v1/alerts", response_model=AlertsResponse, responses={401: errors[401], 422: errors[422]},
                 dependencies=[Depends(authorized)], summary="Surges of negative sentiment, per topic and window")
        async def alerts(topic: Annotated[str | None, Query(max_length=200)] = None,
                         since: AwareDatetime | None = None) -> AlertsResponse:
            return AlertsResponse(alerts=[Alert(**a) for a in await backend.alerts(topic, since)])

        @api.get("/v1/topics", response_model=TopicsResponse, responses={401: errors[401], 422: errors[422]},
                 dependencies=[Depends(authorized)], summary="Topics with texts and their latest sentiment mix")
        async def topics(bucket: Literal["5m", "1h", "1d"] = "1h") -> TopicsResponse:
            return TopicsResponse(topics=[TopicSummary(**t) for t in await backend.topics(bucket)])

        @api.get("/v1/topics/{topic}/trend", response_model=TrendResponse,
                 responses={401: errors[401], 422: errors[422]}, dependencies=[Depends(authorized)],
                 summary="A topic's texts per sentiment label and time bucket")
        async def trend(topic: Annotated[str, Path(max_length=200)],
                        bucket: Literal["5m", "1h", "1d"] = "1h") -> TrendResponse:
            return TrendResponse(points=[TrendPoint(**p) for p in await backend.trend(topic, bucket)])

    if search:
        SearchRequest = search_request(limits)

        @api.post("/v1/search", response_model=SearchResponse, responses=errors, dependencies=[Depends(authorized)],
                  summary="Search the knowledge index by meaning: the k best passages with their scores")
        async def search_passages(body: SearchRequest) -> SearchResponse:
            found = await backend.search(body.query, body.k)
            return SearchResponse(results=[Passage(**h) for h in found.hits], min_score=found.min_score,
                                  relevant=bool(found.hits) and found.hits[0]["score"] >= found.min_score)

    @api.get("/v1/models", responses={401: errors[401]}, dependencies=[Depends(authorized)],
             summary="Model versions, traffic fractions, hand-off calibration, batching and playbook")
    async def models() -> dict[str, Any]:
        return await backend.describe()

    ui = importlib.resources.files("serve_app") / "ui"

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        """The page to try the assistant (serve_app/ui): static, it calls the /v1 routes with the tab's token."""
        return HTMLResponse((ui / "index.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    api.mount("/ui", StaticFiles(directory=str(ui)), name="ui")

    @api.get("/healthz", summary="Liveness of the ingress")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return api
