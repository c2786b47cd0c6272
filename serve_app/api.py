"""The HTTP API: request and response schemas, validation, auth and routes, built by ``make_api``.

``make_api`` takes the model side as a ``Backend`` (the Serve ingress passes one that calls the model
deployments through handles; unit tests pass an in-process one), so the API is tested without Ray.

    POST /v1/classify  {"texts": [...], "top_k": 3}      -> label, score and top-k per text
    POST /v1/assist    {"message": "...", "slots": {...}} -> intent, confidence, reply, handoff, entities
    POST /v1/entities  {"texts": [...]}                   -> entities with character offsets per text
    GET  /v1/models    versions, traffic, calibration, playbook      GET /healthz     OpenAPI at /docs

Routes exist for the models served: /v1/classify and /v1/assist with an intent model, /v1/entities with an
entity model (and /v1/assist then carries the message's entities and fills the playbook's entity slots).

Every client error is a 4xx JSON ``{"error": ..., "details": [{"field": ..., "message": ...}]}``; the
details never echo the request's text. Request texts are never logged.
"""

# No `from __future__ import annotations`: FastAPI must see the request classes that make_api defines
# locally, not their names.
import asyncio
import hmac
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Protocol

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints
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


@dataclass
class Tagging:
    """The entity model's answer: per text, its entities (``jobs.tagging.char_spans``)."""

    version: str
    entities: list[list[dict[str, Any]]]
    replica: str = ""


class ModelUnavailable(RuntimeError):
    """No model replica answered in time (answered with 503)."""


class Backend(Protocol):
    """The model side as the API sees it."""

    async def classify(self, texts: list[str]) -> Classification: ...

    async def entities(self, texts: list[str]) -> Tagging: ...

    async def describe(self) -> dict[str, Any]: ...


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


class AssistResponse(BaseModel):
    intent: str = Field(description="Most likely intent")
    confidence: float = Field(description="Its probability, 0-1")
    reply: str = Field(description="Reply for the customer (from the playbook, or generated)")
    handoff: bool = Field(description="Whether a human takes over")
    handoff_reason: Literal["low_confidence", "intent_policy"] | None = Field(
        description="low_confidence: confidence below the threshold; intent_policy: the playbook hands this intent off")
    threshold: float = Field(description="Hand-off threshold in force for this model version")
    alternatives: list[Scored] = Field(description="The top_k intents, best first")
    model_version: str = Field(description="Model version that answered")
    entities: list[Entity] | None = Field(default=None, description="Entities in the message (null when no "
                                          "entity model is served); they fill the playbook's slots")
    entity_model_version: str | None = Field(default=None, description="Entity model version that answered")


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


def make_api(backend: Backend, playbook: Playbook, limits: Limits = Limits(), api_token: str | None = None,
             on_decision: Callable[[Decision, str], None] | None = None, intents: bool = True,
             entities: bool = False) -> FastAPI:
    """The FastAPI app of the assistant.

    Args:
        backend: the model side (classification, entities and a description of the model versions).
        playbook: replies per intent.
        limits: request limits.
        api_token: when set, every /v1 route needs ``Authorization: Bearer <token>`` (401 otherwise).
        on_decision: called with each assist decision and the answering version (metrics counters).
        intents: an intent model is served (/v1/classify, /v1/assist).
        entities: an entity model is served (/v1/entities; entities and slots in /v1/assist).
    """
    ClassifyRequest, AssistRequest, EntitiesRequest = request_models(limits)
    errors = {code: {"model": ErrorResponse, "description": text} for code, text in [
        (400, "Body that is not UTF-8 JSON"), (401, "Missing or wrong bearer token"),
        (422, "Invalid request: the details name each bad field"), (503, "No model replica could answer")]}
    api = FastAPI(title="slimray assistant", version="1",
                  description="Intent classification, entity tagging and assistant replies, served by Ray Serve.")
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

        @api.post("/v1/assist", response_model=AssistResponse, responses=errors,
                  dependencies=[Depends(authorized)],
                  summary="Answer a customer message: intent, reply, and whether a human takes over")
        async def assist(body: AssistRequest, response: Response) -> AssistResponse:
            if entities:  # both models at once: the message waits for the slower of the two, not their sum
                result, found = await asyncio.gather(backend.classify([body.message]),
                                                     backend.entities([body.message]))
            else:
                result, found = await backend.classify([body.message]), None
            tag(response, result)
            top = result.top[0]
            spans = found.entities[0] if found is not None else None
            decision = decide(playbook, top[0][0], top[0][1], result.threshold, body.slots, result.version, spans)
            if on_decision is not None:
                on_decision(decision, result.version)
            return AssistResponse(
                intent=decision.intent, confidence=decision.confidence, reply=decision.reply,
                handoff=decision.handoff, handoff_reason=decision.handoff_reason, threshold=result.threshold,
                alternatives=[Scored(label=label, score=score) for label, score in top[:body.top_k]],
                model_version=result.version, entities=None if spans is None else [Entity(**e) for e in spans],
                entity_model_version=None if found is None else found.version)

    if entities:
        @api.post("/v1/entities", response_model=EntitiesResponse, responses=errors,
                  dependencies=[Depends(authorized)],
                  summary="Find entities: type, text, score and character offsets per text")
        async def find_entities(body: EntitiesRequest, response: Response) -> EntitiesResponse:
            result = await backend.entities(body.texts)
            tag(response, result)
            return EntitiesResponse(model_version=result.version, results=[
                EntitiesResult(entities=[Entity(**e) for e in row]) for row in result.entities])

    @api.get("/v1/models", responses={401: errors[401]}, dependencies=[Depends(authorized)],
             summary="Model versions, traffic fractions, hand-off calibration, batching and playbook")
    async def models() -> dict[str, Any]:
        return await backend.describe()

    @api.get("/healthz", summary="Liveness of the ingress")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return api
