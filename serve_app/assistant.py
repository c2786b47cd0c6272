"""The assistant's logic, free of Ray and HTTP: a playbook of replies per intent and the hand-off decision.

A playbook is YAML (see ``jobs/samples/harbor_bank/playbook.yaml``)::

    default: "Thanks for your message. I have passed it to a colleague."   # reply when handing off
    intents:
      card_lost_or_stolen: {reply: "I've frozen your card, {customer_name}.", handoff: true}

Intents the playbook leaves out get a generated reply naming the topic. Templates take slots in braces:
``{intent}`` (label), ``{topic}`` (label in words), ``{confidence}`` (0-1), ``{model_version}`` and any
slot the request sends (``customer_name``…); an unknown slot renders empty, never as an error.

With an entity model served, an intent may fill slots from the entities found in the message, and say
something else when the message names none::

    intents:
      branch_hours:
        reply: "Our {location} branch opens at 9."
        slots: {location: location}             # slot name: entity type
        fallback: "Which branch do you mean?"    # when a declared slot is missing
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.errors import InputError

PLAYBOOK_FILE = "playbook.yaml"
GENERATED_HANDOFF = "Thanks for your message. I have passed it to a colleague, who will reply shortly."
GENERATED_REPLY = "Thanks for your message about {topic}."


class IntentReply(BaseModel):
    """What the assistant says for one intent."""

    model_config = ConfigDict(extra="forbid")

    reply: str = Field(description="Reply template; slots in {braces}")
    handoff: bool = Field(default=False, description="Also hand the conversation to a human (policy, "
                          "whatever the confidence)")
    slots: dict[str, str] = Field(default_factory=dict, description="Template slot -> entity type: the slot "
                                  "takes the text of the message's most confident entity of that type")
    fallback: str | None = Field(default=None, description="Reply when a declared slot has no entity in the "
                                 "message (nor a value in the request); default: the reply with the slot empty")
    search: bool = Field(default=False, description="When a knowledge index and a generator are served, answer "
                         "this intent from the documents instead (e.g. an out-of-scope intent); the reply is "
                         "said when they find nothing relevant or are not served")


class Playbook(BaseModel):
    """Replies per intent; ``default`` is said when a message goes to a human for low confidence."""

    model_config = ConfigDict(extra="forbid")

    default: str = Field(default=GENERATED_HANDOFF, description="Reply when handing off for low confidence")
    intents: dict[str, IntentReply] = Field(default_factory=dict, description="Reply per intent label")


class _SlotFormatter(string.Formatter):
    """str.format for untrusted slot values: a missing slot is empty; no attribute or index lookups
    (``{intent.__class__}``, ``{0}``); a format spec that does not fit the value falls back to str()."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        if not field_name.isidentifier():
            return "", field_name
        return kwargs.get(field_name, ""), field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        try:
            return super().format_field(value, format_spec)
        except (ValueError, TypeError):
            return str(value)


_FORMATTER = _SlotFormatter()


def render(template: str, slots: dict[str, Any]) -> str:
    return _FORMATTER.vformat(template, (), slots)


def topic_of(label: str) -> str:
    """``card_not_arrived`` -> ``card not arrived``."""
    return " ".join(label.replace("_", " ").replace("-", " ").split()).lower()


def _check_template(template: str, where: str) -> None:
    try:
        render(template, {})  # unbalanced braces, "{0} {}" mixes, nested specs: caught at load, not per request
    except ValueError as e:
        raise InputError(f"playbook {where}: bad template {template[:80]!r}: {e} "
                         "(write a literal brace as {{ or }})") from None


def load_playbook(path: str | Path) -> Playbook:
    """Reads and checks a playbook YAML file; errors name the file and the bad entry."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"playbook {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise InputError(f"playbook {str(path)!r} is not valid YAML: {e}") from None
    try:
        playbook = Playbook.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"playbook {str(path)!r}: {where}: {first['msg']}") from None
    _check_template(playbook.default, f"{path} default")
    for intent, entry in playbook.intents.items():
        _check_template(entry.reply, f"{path} intent {intent!r}")
        if entry.fallback is not None:
            _check_template(entry.fallback, f"{path} intent {intent!r} fallback")
    return playbook


def slot_types(playbook: Playbook) -> set[str]:
    """The entity types the playbook's slots ask for."""
    return {kind for entry in playbook.intents.values() for kind in entry.slots.values()}


def entity_slots(entry: IntentReply, entities: list[dict[str, Any]]) -> dict[str, str]:
    """Values of ``entry``'s declared slots: per slot, the text of the most confident entity of its type."""
    out: dict[str, str] = {}
    for slot, kind in entry.slots.items():
        found = [e for e in entities if e["type"] == kind]
        if found:
            out[slot] = max(found, key=lambda e: e["score"])["text"]
    return out


def find_playbook(model_dir: str | Path) -> Path | None:
    """The playbook of a model version: ``playbook.yaml`` in the model folder, else in the source folder of
    the data it was fine-tuned on (lineage: model manifest ``data`` -> data manifest ``source``)."""
    model_dir = Path(model_dir).expanduser()
    if (model_dir / PLAYBOOK_FILE).is_file():
        return model_dir / PLAYBOOK_FILE
    try:
        data_dir = Path(json.loads((model_dir / "manifest.json").read_text())["data"])
        source = Path(json.loads((data_dir / "manifest.json").read_text())["source"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return source / PLAYBOOK_FILE if (source / PLAYBOOK_FILE).is_file() else None


@dataclass(frozen=True)
class Decision:
    """What the assistant answers to one classified message."""

    intent: str
    confidence: float
    reply: str
    handoff: bool
    handoff_reason: str | None  # "low_confidence", "intent_policy" or None


def decide(playbook: Playbook, intent: str, confidence: float, threshold: float,
           slots: dict[str, str] | None = None, model_version: str = "",
           entities: list[dict[str, Any]] | None = None) -> Decision:
    """Chooses the reply for the top intent; below ``threshold`` the message goes to a human.

    ``entities`` (``{"type", "text", "score", ...}`` of the message) fill the intent's declared slots; a slot
    with no entity keeps the request's value, and with neither the intent's ``fallback`` is said."""
    values = {**(slots or {}), "intent": intent, "topic": topic_of(intent), "confidence": confidence,
              "model_version": model_version}
    if confidence < threshold:
        return Decision(intent, confidence, render(playbook.default, values), True, "low_confidence")
    entry = playbook.intents.get(intent)
    if entry is None:
        return Decision(intent, confidence, render(GENERATED_REPLY, values), False, None)
    values.update(entity_slots(entry, entities or []))
    missing = [slot for slot in entry.slots if not values.get(slot)]
    template = entry.fallback if missing and entry.fallback is not None else entry.reply
    return Decision(intent, confidence, render(template, values), entry.handoff,
                    "intent_policy" if entry.handoff else None)
