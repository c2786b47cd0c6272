"""Reading labelled text from files, split folders or the Hugging Face hub into pyarrow tables.

Parsing is pyarrow's (quoted fields with line breaks, escaped quotes); this module only finds the files,
checks their encoding first so that a bad byte is reported with its line, and names splits.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from jobs.artifacts import file_sha256
from jobs.errors import InputError

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


def _check_utf8(path: Path) -> None:
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError(f"{path}: file is empty")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}: line {line} holds bytes that are not UTF-8 ({raw[e.start:e.start + 4]!r} at byte {e.start}); "
            "re-encode the file as UTF-8"
        ) from None


def read_table(path: Path, column_names: list[str] | None = None) -> pa.Table:
    """One file as a table. ``column_names`` names the columns of a headerless CSV/TSV."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: unsupported format {suffix!r}; use one of {', '.join(FORMATS)}")
    if suffix != ".parquet":
        _check_utf8(path)
    try:
        if suffix in (".csv", ".tsv"):
            tsv = suffix == ".tsv"
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(column_names=column_names or None, block_size=1 << 24),
                # TSV files rarely quote; a stray '"' must not swallow the following lines.
                parse_options=pacsv.ParseOptions(delimiter="\t" if tsv else ",", newlines_in_values=not tsv,
                                                 quote_char=False if tsv else '"'),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
            )
        elif suffix in (".jsonl", ".json"):
            table = pajson.read_json(path)
        else:
            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot be parsed as {suffix[1:].upper()}: {e}") from None
    if table.num_rows == 0:
        raise InputError(f"{path}: file has a header but no rows")
    return table


def find_split_files(folder: Path, formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """``train.*`` (required), ``validation.*``/``valid.*``/``dev.*`` and ``test.*`` in a folder, with a
    suffix of ``formats``."""
    found: dict[str, Path] = {}
    for split, stems in SPLIT_ALIASES.items():
        for stem in stems:
            for suffix in formats:
                candidate = folder / f"{stem}{suffix}"
                if candidate.is_file():
                    if split in found:
                        raise InputError(f"{folder}: both {found[split].name} and {candidate.name} look like the "
                                         f"{split} split; keep one")
                    found[split] = candidate
    if "train" not in found:
        files = sorted(p.name for p in folder.iterdir())[:20]
        raise InputError(f"{folder}: no train split found (expected train{{{','.join(formats)}}}); folder holds {files}")
    return found


def load_source(source: str, column_names: list[str] | None = None) -> tuple[dict[str, pa.Table], list[dict]]:
    """Returns tables by split name and the provenance of every input (path, sha256, bytes)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = find_split_files(path)
    elif path.is_file():
        files = {"train": path}
    elif path.exists():
        raise InputError(f"{source}: not a regular file or folder")
    elif "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return _load_hub(source)
    else:
        raise InputError(f"source {source!r} does not exist (expected a file, a folder of split files, "
                         "or a Hugging Face dataset id like 'owner/name')")
    tables = {split: read_table(p, column_names) for split, p in files.items()}
    return tables, provenance(files)


def provenance(files: dict[str, Path]) -> list[dict]:
    """Split, resolved path, sha256 and size of each input file (the manifest's ``inputs``)."""
    return [{"split": s, "path": str(p.resolve()), "sha256": file_sha256(p), "bytes": p.stat().st_size}
            for s, p in files.items()]


def _load_hub(dataset_id: str) -> tuple[dict[str, pa.Table], list[dict]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{dataset_id!r} is not a local path; loading it from the Hugging Face hub needs "
                         "`pip install datasets` and network access to the hub") from None
    try:
        dd = datasets.load_dataset(dataset_id)
    except Exception as e:  # the hub raises many types: connection, missing repo, gated dataset
        raise InputError(f"cannot load dataset {dataset_id!r} from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e)[:200]}); is the hub reachable? "
                         "Download it and pass a local file or folder instead") from None
    tables = {}
    for split, ds in dd.items():
        for canonical, aliases in SPLIT_ALIASES.items():
            if split in aliases:
                tables[canonical] = ds.data.table
    if "train" not in tables:
        raise InputError(f"hub dataset {dataset_id!r} has no train split (splits: {list(dd)})")
    inputs = [{"split": s, "path": f"hf://{dataset_id}", "sha256": dd[s]._fingerprint, "bytes": 0} for s in dd]
    return tables, inputs
