"""Typed configs and the one command-line mechanism every slimray command uses.

A command's pydantic model *is* its command-line interface: every top-level scalar field becomes a flag
(``zero_stage`` → ``--zero-stage``; booleans get ``--x/--no-x``), fields marked positional become arguments,
nested fields are reachable with ``--set deepspeed.overlap_comm=false``, and ``--config FILE`` loads a YAML
instance of the same model. Precedence: defaults < file < flags < --set. A flag is shorthand for ``--set``:
both go through ``set_dotted`` (values parsed as YAML, except for fields that take text), so there is one
conversion rule. Every error is one line per problem that names the key and quotes the value.

Why not a library: pydantic-settings' CLI source and jsonargparse were evaluated; neither offers ``--config``
plus ``--set a.b=c`` overrides with one-line errors quoting the value without wrapping most of their
machinery, and both change the flags users type today (``--deepspeed.overlap_comm``).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Generic, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, WithJsonSchema, field_validator

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


class _NameOrPath:
    """Marks a text field that holds either a name (``minilm``, a hub id) or a local path."""


# A folder or file a command reads or writes: a local path (a Path) or a storage URI (kept as text).
Location = Annotated[Path | str, PlainValidator(_location), WithJsonSchema({"type": "string"})]
# A name or a local path (``--model minilm`` or ``--model runs/b77/ft``): a location only when it names
# something that exists here (see ``location_fields``).
NameOrPath = Annotated[str, _NameOrPath()]


# Counts, sizes and steps beyond this are typing mistakes (``--epochs 1e99``), refused before any work starts.
MAX_NUMBER = 2**31 - 1


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are rejected, numbers given as text are accepted; NaN,
    infinities and numbers beyond ``MAX_NUMBER`` are refused."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _numbers_in_range(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_NUMBER:
            raise ValueError(f"out of range (at most {MAX_NUMBER:,})")
        return value


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad key and value, one line each."""


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line per error: ``[source: ]key: message (got value)``."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        hint = " — unknown key; check the spelling against --help" if e["type"] == "extra_forbidden" else ""
        lines.append(f"{source + ': ' if source else ''}{where}: {e['msg']}{got}{hint}")
    return "\n".join(lines)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping, or a ConfigError naming the file and what is wrong with it."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise ConfigError(f"config file {str(path)!r} is not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def set_dotted(target: dict[str, Any], dotted: str, text: bool = False) -> None:
    """Applies one ``a.b.c=value`` override; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)
    unless ``text`` (the field takes text, so ``007`` stays ``'007'``)."""
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
        node[parts[-1]] = raw if text else yaml.safe_load(raw)
    except yaml.YAMLError:
        node[parts[-1]] = raw  # not YAML: the text itself, which the schema then accepts or rejects by name


def as_arguments(model_cls: type[BaseModel], values: dict[str, Any]) -> list[str]:
    """Command-line arguments that ``parse_args(model_cls, ...)`` turns back into ``values`` (top-level keys):
    a flag per scalar (``--workers 2``, ``--overwrite`` / ``--no-overwrite``), ``--set key=<JSON>`` for the
    rest (nested sections, lists, null). JSON is YAML, so ``set_dotted`` reads it back unchanged."""
    import json

    args: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        annotation = model_cls.model_fields[key].annotation
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (int, float)) or isinstance(value, str) and takes_text(annotation):
            args += [flag, str(value)]
        else:
            args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def validate(model_cls: type[C], data: dict[str, Any], source: str | None = None) -> C:
    """``model_cls`` from ``data``, or a ConfigError with one line per problem (prefixed by ``source``)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def build_config(model_cls: type[C], file: Path | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None, source: str | None = None) -> C:
    """Merges file < flags < overrides and validates the result."""
    data: dict[str, Any] = load_yaml(file) if file else {}
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    for dotted in overrides or []:
        set_dotted(data, dotted)
    return validate(model_cls, data, source or (str(file) if file else None))


# ----------------------------------------------------------------------------------------------------------
# Reading a model's fields.


def _flat_types(annotation: Any) -> set[Any]:
    """The types in an annotation, through Optional/Union and Annotated (``Location | None`` → Path, str, None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _flat_types(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_flat_types(a) for a in args))
    return {annotation}


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return next((t for t in _flat_types(annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)


def takes_text(annotation: Any) -> bool:
    """A field whose command-line value is kept as text (not parsed as YAML)."""
    return bool({str, Path} & _flat_types(annotation))


def location_fields(model_cls: type[BaseModel]) -> dict[str, bool]:
    """Top-level fields that name a place on disk or in storage → True when they always do (typed Path or
    Location), False when only a value that exists here is a place (``NameOrPath``: ``--model minilm``)."""
    found = {}
    for name, f in model_cls.model_fields.items():
        if Path in _flat_types(f.annotation):
            found[name] = True
        elif any(isinstance(m, _NameOrPath) for m in f.metadata):
            found[name] = False
    return found


def _cli(field_info: Any) -> dict[str, Any]:
    """Command-line hints in a field's ``json_schema_extra``: ``positional`` (True or "remainder"), ``short``."""
    extra = field_info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


# ----------------------------------------------------------------------------------------------------------
# The parser.


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def make_parser(model_cls: type[BaseModel], prog: str, config_flags: bool = True,
                dry_run: bool = False) -> argparse.ArgumentParser:
    """An argparse parser whose arguments and help come from the model's fields and their descriptions."""
    parser = _Parser(prog=prog, description=inspect.cleandoc(model_cls.__doc__ or ""),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if dry_run:
        parser.add_argument("--dry-run", action="store_true",
                            help="parse and validate the config, open and check the inputs and the output, print "
                            "what would run, and exit; starts no Ray and writes nothing")
    if config_flags:
        parser.add_argument("--config", type=Path, default=None, help="YAML file holding this command's config")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="dotted override applied last, e.g. --set deepspeed.overlap_comm=false")
    nested = []
    for name, f in model_cls.model_fields.items():
        default = f.get_default(call_default_factory=True)
        sub = _nested_model(f.annotation)
        if sub is not None:
            nested += [f"  --set {name}.{k}=…  {sf.description or ''} [default: {sf.get_default(call_default_factory=True)}]"
                       for k, sf in sub.model_fields.items()]
            continue
        help_text = f.description or ""
        hints = _cli(f)
        if hints.get("positional"):
            remainder = hints["positional"] == "remainder"
            parser.add_argument(name, nargs=argparse.REMAINDER if remainder else (None if f.is_required() else "?"),
                                default=None, help=help_text)
            continue
        flags = [*([hints["short"]] if "short" in hints else []), "--" + name.replace("_", "-")]
        if f.is_required():
            help_text += " (required unless given in --config)" if config_flags else " (required)"
        else:
            help_text += f" [default: {default}]"
        if bool in _flat_types(f.annotation):
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=help_text)
    if nested:
        parser.epilog = "nested options:\n" + "\n".join(nested)
    return parser


@dataclass
class CommandLine(Generic[C]):
    """A parsed command line: the validated config, and where each top-level value came from."""

    config: C
    # field → how it was given: "--out", "--set out", or "out in --config FILE:" (for error messages)
    sources: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False


def parse_command_line(model_cls: type[C], argv: list[str] | None, prog: str, config_flags: bool = True,
                       dry_run: bool = False) -> CommandLine[C]:
    """Parses and validates one command line; ConfigError (one line per problem) on any mistake."""
    args = vars(make_parser(model_cls, prog, config_flags, dry_run).parse_args(argv))
    file, overrides = args.pop("config", None), args.pop("overrides", [])
    wants_dry_run = bool(args.pop("dry_run", False))
    data: dict[str, Any] = load_yaml(file) if file else {}
    sources = {k: f"{k} in --config {file}:" for k in data}
    for name, value in args.items():
        if value is None:
            continue
        annotation = model_cls.model_fields[name].annotation
        if isinstance(value, str) and not value.strip():
            # An empty flag would read as null, i.e. the default (`--epochs ''` would train with chosen epochs)
            raise ConfigError(f"--{name.replace('_', '-')}: empty value (got {value!r}); leave the flag out for "
                              "the default")
        if isinstance(value, str):
            set_dotted(data, f"{name}={value}", text=takes_text(annotation))
        else:  # booleans and positional lists arrive typed
            data[name] = value
        sources[name] = "--" + name.replace("_", "-")
    for dotted in overrides:
        key = dotted.partition("=")[0].strip()
        field_info = model_cls.model_fields.get(key)
        set_dotted(data, dotted, text=field_info is not None and takes_text(field_info.annotation))
        sources[key.split(".")[0]] = f"--set {key}"
    return CommandLine(validate(model_cls, data, str(file) if file else None), sources, wants_dry_run)


def parse_args(model_cls: type[C], argv: list[str] | None, prog: str) -> C:
    return parse_command_line(model_cls, argv, prog).config


def exit_with_error(prog: str, err: Exception, status: int = 2) -> typing.NoReturn:
    """Prints ``prog: error: line`` for each line of the message and exits (status 2: nothing was done)."""
    for line in str(err).splitlines() or [""]:
        print(f"{prog}: error: {line}", file=sys.stderr)
    raise SystemExit(status)


def run_cli(model_cls: type[C], main: Callable[[C], Any], argv: list[str] | None = None,
            prog: str | None = None, check: Callable[[C], str] | None = None) -> None:
    """Entry point shared by ``python -m <package>.<stage>`` and ``slimray <command>``: parse, validate, run.

    With ``check`` (the stage's own input checks, the ones its ``main`` starts with), the command takes
    ``--dry-run``: parse, validate, ``check``, print its one-line summary, exit 0, and start nothing.
    Config, input and storage errors print one clear line each and exit with status 2 (no traceback).
    """
    import logging

    from jobs.errors import InputError  # local: keeps config importable without the ML stack

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    prog = prog or model_cls.__name__
    try:
        line = parse_command_line(model_cls, argv, prog, dry_run=check is not None)
        if line.dry_run and check is not None:
            print(f"{prog}: dry run: config valid, inputs checked; {check(line.config)}; nothing was started")
            return
        main(line.config)
    except (ConfigError, InputError, StorageError) as e:
        exit_with_error(prog, e)
