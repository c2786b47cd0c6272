"""Typed stage configs: YAML files, command-line flags and dotted overrides, one schema.

A stage's pydantic model *is* its command-line interface: every top-level scalar field becomes a flag
(``zero_stage`` → ``--zero-stage``), nested fields are reachable with ``--set deepspeed.overlap_comm=false``,
and ``--config FILE`` loads a YAML instance of the same model. Precedence: defaults < file < flags < --set.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, WithJsonSchema

from cluster.storage import StorageError, check_uri, is_uri

C = TypeVar("C", bound=BaseModel)


def _location(value: Any) -> Path | str:
    """A storage URI stays text (checked for form, no network); anything else is a local path."""
    if isinstance(value, str) and is_uri(value):
        if value.lower().startswith("file://"):
            return Path(value[len("file://"):])
        return check_uri(value)
    if isinstance(value, (str, Path)) and str(value).strip():
        return Path(value)
    raise ValueError("expected a local path or a storage URI such as s3://bucket/path or gs://bucket/path")


# A folder a stage reads or writes: a local path (a Path) or a storage URI (kept as text, see cluster/storage.py).
Location = Annotated[Path | str, PlainValidator(_location), WithJsonSchema({"type": "string"})]


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are rejected, numbers given as text are accepted."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad key and value."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        hint = ""
        if e["type"] == "extra_forbidden":
            hint = " — unknown key; check the spelling against --help"
        lines.append(f"  {where}: {e['msg']}{got}{hint}")
    return "\n".join(lines)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def set_dotted(target: dict[str, Any], dotted: str) -> None:
    """Applies one ``a.b.c=value`` override; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    key, sep, raw = dotted.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {dotted!r} must look like key.sub=value")
    parts = key.strip().split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted!r}: value is not valid YAML: {e}") from None


def build_config(model_cls: type[C], file: Path | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None, source: str = "config") -> C:
    """Merges file < flags < overrides and validates the result."""
    data: dict[str, Any] = load_yaml(file) if file else {}
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    for dotted in overrides or []:
        set_dotted(data, dotted)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source if not file else f"{source} ({file})")) from None


def _is_nested_model(annotation: Any) -> bool:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return True
    return False


def _is_bool(annotation: Any) -> bool:
    return bool in (annotation, *typing.get_args(annotation))


def make_parser(model_cls: type[BaseModel], prog: str) -> argparse.ArgumentParser:
    """An argparse parser whose flags and help come from the model's fields and their descriptions."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(model_cls.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML file holding this stage's config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override applied last, e.g. --set deepspeed.overlap_comm=false")
    nested = []
    for name, field in model_cls.model_fields.items():
        if _is_nested_model(field.annotation):
            sub = next(a for a in (field.annotation, *typing.get_args(field.annotation))
                       if isinstance(a, type) and issubclass(a, BaseModel))
            nested += [f"  --set {name}.{k}=…  {f.description or ''} [default: {f.get_default(call_default_factory=True)}]"
                       for k, f in sub.model_fields.items()]
            continue
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = field.description or ""
        if field.is_required():
            help_text += " (required unless given in --config)"
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} [default: {default}]")
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                                help=f"{help_text} [default: {default}]" if not field.is_required() else help_text)
    if nested:
        parser.epilog = "nested options:\n" + "\n".join(nested)
    return parser


def _flat_types(annotation: Any) -> set[Any]:
    """The types in an annotation, through Optional/Union and Annotated (``Location | None`` → Path, str, None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _flat_types(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_flat_types(a) for a in args))
    return {annotation}


def _flag_value(annotation: Any, raw: Any) -> Any:
    """Flags arrive as text: parse it as YAML (numbers, lists, Literal ints) unless the field takes text."""
    if not isinstance(raw, str) or {str, Path} & _flat_types(annotation):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_args(model_cls: type[C], argv: list[str] | None, prog: str) -> C:
    args = vars(make_parser(model_cls, prog).parse_args(argv))
    file, overrides = args.pop("config"), args.pop("overrides")
    args = {k: _flag_value(model_cls.model_fields[k].annotation, v) for k, v in args.items()}
    return build_config(model_cls, file=file, flags=args, overrides=overrides, source=f"{prog} config")


def run_stage(model_cls: type[C], main: Callable[[C], Any], argv: list[str] | None = None,
              prog: str | None = None) -> None:
    """Entry point shared by ``python -m jobs.<stage>`` and ``slimray <stage>``: parse, validate, run.

    Config, input and storage errors print one clear message and exit with status 2 (no traceback).
    """
    from jobs.errors import InputError  # local: keeps config importable without the ML stack

    prog = prog or model_cls.__name__
    try:
        cfg = parse_args(model_cls, argv, prog)
        main(cfg)
    except (ConfigError, InputError, StorageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
