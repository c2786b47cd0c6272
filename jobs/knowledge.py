"""The knowledge base: a company's own documents, split into passages, embedded, and stored in Qdrant.

    slimray index --docs jobs/samples/harbor_bank/knowledge --out runs/kb \
        --calibration jobs/samples/harbor_bank/rag/calibration.jsonl

Documents are Markdown (one passage per ``##`` section), plain text (one per paragraph), HTML (one per
``<h2>`` section) and CSV FAQs (one per row with a question and an answer column). A passage's id is
``<file stem>-<slug of its heading>`` (``<stem>-<n>`` for paragraphs and FAQ rows), so ids stay stable
when other sections change, and a section longer than ``--max-words`` is cut into ``-2``, ``-3``... parts.

The vector store is Qdrant: embedded (a folder inside ``--out``, no server: Qdrant's local mode) by default,
or a Qdrant server with ``--qdrant-url`` (what a production deployment runs; the same client API, so the
retriever does not change). Why Qdrant: one client for both modes, payload filters (re-indexing deletes a
changed document's passages by filter), and a server that is a single open-source binary or container.

Re-indexing the same ``--out`` updates only what changed: each document's SHA-256 is kept in
``index.json``; unchanged documents are not re-embedded, a changed document's passages are replaced, a
removed document's passages are deleted. A different encoder rebuilds everything.

``--calibration FILE`` (JSONL ``{"question", "passage_id"}``, ``passage_id`` null for questions the documents
do not answer) sets the score below which the assistant treats a search as finding nothing relevant: the
threshold that best separates the top scores of answerable questions from those of the others.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html.parser
import json
import logging
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, field_validator

from jobs.artifacts import atomic_dir, manifest, read_json, write_json
from jobs.config import NameOrPath, StrictModel, run_cli
from jobs.errors import InputError

log = logging.getLogger("slimray.index")

DOC_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".csv")
COLLECTION = "passages"
# Cosine score below which a search counts as finding nothing, when no --calibration file was given
# (all-MiniLM-L6-v2's scores for unrelated sentence pairs mostly fall below it).
UNCALIBRATED_MIN_SCORE = 0.35
QUESTION_COLUMNS = ("question", "q", "query", "title")
ANSWER_COLUMNS = ("answer", "a", "response", "text", "body")


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    doc: str  # path relative to the docs folder

    def embed_text(self) -> str:
        return f"{self.title}: {self.text}"


@dataclasses.dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    doc: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _words_parts(text: str, max_words: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + max_words]) for i in range(0, max(len(words), 1), max_words)]


def _sections_to_passages(stem: str, doc: str, doc_title: str, sections: list[tuple[str, str]],
                          max_words: int) -> list[Passage]:
    out: list[Passage] = []
    seen: set[str] = set()
    for heading, body in sections:
        body = " ".join(body.split())
        if not body:
            continue
        base = f"{stem}-{slug(heading)}" if heading else f"{stem}-intro"
        pid, n = base, 2
        while pid in seen:  # a repeated heading in one file
            pid, n = f"{base}-{n}", n + 1
        title = f"{doc_title} - {heading}" if heading and doc_title else heading or doc_title or stem
        for i, part in enumerate(_words_parts(body, max_words)):
            part_id = pid if i == 0 else f"{pid}-{i + 1}"
            seen.add(part_id)
            out.append(Passage(part_id, title, part, doc))
        seen.add(pid)
    return out


def split_markdown(stem: str, doc: str, text: str, max_words: int) -> list[Passage]:
    doc_title, sections, heading, lines = "", [], "", []
    for line in text.splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and len(m.group(1)) == 1 and not doc_title and not sections and not "".join(lines).strip():
            doc_title = m.group(2)
        elif m:
            sections.append((heading, "\n".join(lines)))
            heading, lines = m.group(2), []
        else:
            lines.append(line)
    sections.append((heading, "\n".join(lines)))
    return _sections_to_passages(stem, doc, doc_title, sections, max_words)


def split_text(stem: str, doc: str, text: str, max_words: int) -> list[Passage]:
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return _sections_to_passages(stem, doc, stem, [(str(i + 1), p) for i, p in enumerate(paragraphs)], max_words)


class _HTMLSections(html.parser.HTMLParser):
    """Title, h1, and the text under each h2 (scripts and styles skipped)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title, self.h1, self.sections = "", "", [["", []]]
        self._tag: str | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("title", "h1", "h2"):
            self._tag = tag
            if tag == "h2":
                self.sections.append(["", []])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == self._tag:
            self._tag = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._tag == "title":
            self.title += data
        elif self._tag == "h1":
            self.h1 += data
        elif self._tag == "h2":
            self.sections[-1][0] += data
        else:
            self.sections[-1][1].append(data)


def split_html(stem: str, doc: str, text: str, max_words: int) -> list[Passage]:
    parser = _HTMLSections()
    parser.feed(text)
    sections = [(" ".join(h.split()), " ".join(body)) for h, body in parser.sections]
    return _sections_to_passages(stem, doc, " ".join((parser.h1 or parser.title).split()), sections, max_words)


def _find_column(header: Sequence[str], guesses: Sequence[str], path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for g in guesses:
        if g in lowered:
            return lowered.index(g)
    raise InputError(f"{path}: FAQ CSV needs a question and an answer column (one of {list(guesses)}); "
                     f"its header is {list(header)}")


def split_faq_csv(stem: str, doc: str, text: str, path: Path, max_words: int) -> list[Passage]:
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    q, a = _find_column(rows[0], QUESTION_COLUMNS, path), _find_column(rows[0], ANSWER_COLUMNS, path)
    out = []
    for n, row in enumerate(rows[1:], start=1):
        if len(row) <= max(q, a) or not row[a].strip():
            continue
        question = " ".join(row[q].split())
        for i, part in enumerate(_words_parts(" ".join(row[a].split()), max_words)):
            out.append(Passage(f"{stem}-{n}" if i == 0 else f"{stem}-{n}-{i + 1}", question, part, doc))
    return out


def read_document(path: Path, root: Path, max_words: int) -> list[Passage]:
    """The passages of one document (see the module docstring for how each format is split)."""
    doc = path.relative_to(root).as_posix()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stem, suffix = slug(path.stem), path.suffix.lower()
    if suffix in (".md", ".markdown"):
        return split_markdown(stem, doc, text, max_words)
    if suffix in (".html", ".htm"):
        return split_html(stem, doc, text, max_words)
    if suffix == ".csv":
        return split_faq_csv(stem, doc, text, path, max_words)
    return split_text(stem, doc, text, max_words)


def find_documents(docs: Path) -> list[Path]:
    if not docs.is_dir():
        raise InputError(f"--docs {str(docs)!r} is not a folder")
    found = sorted(p for p in docs.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    if not found:
        raise InputError(f"--docs {str(docs)!r} holds no documents ({', '.join(DOC_SUFFIXES)})")
    return found


def read_documents(docs: Path, max_words: int) -> dict[str, tuple[str, list[Passage]]]:
    """doc path (relative) -> (sha256 of its bytes, passages). Passage ids must be unique across documents."""
    out: dict[str, tuple[str, list[Passage]]] = {}
    owner: dict[str, str] = {}
    for path in find_documents(docs):
        passages = read_document(path, docs, max_words)
        doc = path.relative_to(docs).as_posix()
        for p in passages:
            if p.id in owner:
                raise InputError(f"passage id {p.id!r} comes from both {owner[p.id]} and {doc}: rename one file")
            owner[p.id] = doc
        out[doc] = (hashlib.sha256(path.read_bytes()).hexdigest(), passages)
    return out


# ----------------------------------------------------------------------------------------------------------
# Encoder and store.


def point_id(passage_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"slimray-passage:{passage_id}"))


class Encoder:
    """A sentence encoder (sentence-transformers) producing unit-length vectors."""

    def __init__(self, name_or_path: str, threads: int | None = None):
        import torch
        from sentence_transformers import SentenceTransformer

        from jobs.modeling import resolve_model

        if threads:
            torch.set_num_threads(threads)
        self.name = name_or_path
        try:
            self.model = SentenceTransformer(resolve_model(name_or_path), device="cpu")
        except OSError as e:
            raise InputError(f"cannot load the sentence encoder {name_or_path!r}: {str(e)[:300]}") from None
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Any:
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)


def open_client(folder: Path | None, url: str | None) -> Any:
    from qdrant_client import QdrantClient

    if url:
        return QdrantClient(url=url, timeout=30)
    return QdrantClient(path=str(folder))


class KnowledgeIndex:
    """An index folder opened for search: its manifest, encoder and Qdrant collection.

    In embedded mode Qdrant's local store allows one client per folder, so each opener (a retriever
    replica, a benchmark) works on its own private copy of the folder: an index being re-built next to it
    is never half-read.
    """

    def __init__(self, folder: Path | str, encoder: Encoder | None = None, threads: int | None = None):
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "index.json").is_file():
            raise InputError(f"{str(self.folder)!r} is not a knowledge index (no index.json); build one with "
                             "`slimray index --docs FOLDER --out DIR`")
        self.info = read_json(self.folder / "index.json")
        self.encoder = encoder or Encoder(self.info["encoder"], threads)
        self._copy: str | None = None
        if self.info.get("qdrant_url"):
            self.client = open_client(None, self.info["qdrant_url"])
        else:
            self._copy = tempfile.mkdtemp(prefix="slimray-index-")
            shutil.copytree(self.folder / "qdrant", Path(self._copy) / "qdrant")
            self.client = open_client(Path(self._copy) / "qdrant", None)
        self.collection = self.info["collection"]
        self.min_score = float(self.info["min_score"])
        self.passages = {p["id"]: p for p in map(json.loads, (self.folder / "passages.jsonl").read_text(
            encoding="utf-8").splitlines())}

    def close(self) -> None:
        self.client.close()
        if self._copy:
            shutil.rmtree(self._copy, ignore_errors=True)

    def search_many(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        vectors = self.encoder.encode(queries)
        return [self.search_vector(v, k) for v in vectors]

    def search(self, query: str, k: int = 3) -> list[Hit]:
        return self.search_many([query], k)[0]

    def search_vector(self, vector: Any, k: int) -> list[Hit]:
        points = self.client.query_points(self.collection, query=vector.tolist(), limit=k,
                                          with_payload=True).points
        return [Hit(p.payload["id"], p.payload["title"], p.payload["text"], p.payload["doc"], float(p.score))
                for p in points]


# ----------------------------------------------------------------------------------------------------------
# Calibration and the BM25 baseline.


def read_jsonl(path: Path | str, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {str(path)!r}: {e}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        missing = [c for c in required if c not in row]
        if missing:
            raise InputError(f"{path}:{n}: missing {', '.join(map(repr, missing))}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path} holds no records")
    return rows


def best_threshold(positive: Sequence[float], negative: Sequence[float]) -> tuple[float, float]:
    """(threshold, balanced accuracy): the cut between sorted scores that best separates the two groups;
    the threshold is the midpoint of the gap it sits in."""
    import numpy as np

    pos, neg = np.sort(np.asarray(positive, float)), np.sort(np.asarray(negative, float))
    candidates = np.unique(np.concatenate([pos, neg]))
    best = (-1.0, 0.0)
    for i, c in enumerate(candidates):
        bal = ((pos >= c).mean() + (neg < c).mean()) / 2
        if bal > best[0]:
            below = candidates[i - 1] if i else c
            best = (float(bal), float((below + c) / 2))
    return best[1], best[0]


def calibrate(index: KnowledgeIndex, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The no-relevant-passage threshold from questions with and without an answering passage."""
    tops = [hits[0].score if hits else 0.0 for hits in index.search_many([r["question"] for r in rows], 1)]
    positive = [s for s, r in zip(tops, rows) if r.get("passage_id")]
    negative = [s for s, r in zip(tops, rows) if not r.get("passage_id")]
    if not positive or not negative:
        raise InputError("--calibration needs questions with a passage_id and questions with passage_id null "
                         f"(got {len(positive)} and {len(negative)})")
    threshold, balanced = best_threshold(positive, negative)
    return {"min_score": round(threshold, 4), "balanced_accuracy": round(balanced, 4),
            "answerable": len(positive), "unanswerable": len(negative)}


class BM25:
    """BM25 over the same passages (bm25s): the lexical baseline of retrieval."""

    def __init__(self, passages: Sequence[dict[str, Any]]):
        import bm25s

        self.ids = [p["id"] for p in passages]
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize([f"{p['title']}: {p['text']}" for p in passages], stopwords="en",
                                            show_progress=False), show_progress=False)

    def search_many(self, queries: Sequence[str], k: int) -> list[list[str]]:
        import bm25s

        docs, _ = self.retriever.retrieve(bm25s.tokenize(list(queries), stopwords="en", show_progress=False),
                                          k=min(k, len(self.ids)), show_progress=False)
        return [[self.ids[int(i)] for i in row] for row in docs]


def recall_at(gold: Sequence[str], ranked: Sequence[Sequence[str]], k: int) -> float:
    return sum(g in r[:k] for g, r in zip(gold, ranked)) / max(1, len(gold))


# ----------------------------------------------------------------------------------------------------------
# The stage.


class IndexConfig(StrictModel):
    """Split documents into passages, embed them, and write a searchable knowledge index."""

    docs: Path = Field(description="Folder of documents: Markdown, text, HTML, CSV FAQ (question,answer)")
    out: Path = Field(description="Index folder (updated in place: only changed documents are re-embedded)")
    encoder: NameOrPath = Field(default="minilm", description="Sentence encoder: local folder, hub id, or "
                                "'minilm' (all-MiniLM-L6-v2 from its PyPI package)")
    qdrant_url: str | None = Field(default=None, description="A Qdrant server (http://host:6333) to hold the "
                                   "vectors; default: embedded Qdrant inside --out")
    calibration: Path | None = Field(default=None, description="JSONL {question, passage_id} (passage_id null "
                                     "when the documents do not answer it): sets the no-relevant-passage "
                                     f"threshold (default without it: {UNCALIBRATED_MIN_SCORE})")
    max_words: int = Field(default=160, ge=20, le=2000, description="Longest passage in words; longer sections "
                           "are cut into parts")
    rebuild: bool = Field(default=False, description="Re-embed every document even if unchanged")

    @field_validator("qdrant_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"must be an http(s) URL like http://localhost:6333, not {v!r}")
        return v


def _payload(p: Passage) -> dict[str, Any]:
    return dataclasses.asdict(p)


def update_collection(client: Any, encoder: Encoder, docs: dict[str, tuple[str, list[Passage]]],
                      previous: dict[str, Any], rebuild: bool) -> dict[str, int]:
    """Brings the collection in line with ``docs``: embeds new and changed documents, deletes removed ones."""
    from qdrant_client import models

    if rebuild or not client.collection_exists(COLLECTION):
        if client.collection_exists(COLLECTION):
            client.delete_collection(COLLECTION)
        client.create_collection(COLLECTION, vectors_config=models.VectorParams(size=encoder.dim,
                                                                                 distance=models.Distance.COSINE))
        previous = {}
    counts = {"unchanged": 0, "changed": 0, "added": 0, "removed": 0, "embedded_passages": 0}
    for doc in sorted(set(previous) - set(docs)):
        client.delete(COLLECTION, points_selector=models.FilterSelector(filter=models.Filter(
            must=[models.FieldCondition(key="doc", match=models.MatchValue(value=doc))])))
        counts["removed"] += 1
    todo: list[Passage] = []
    for doc, (sha, passages) in docs.items():
        if previous.get(doc, {}).get("sha256") == sha:
            counts["unchanged"] += 1
            continue
        if doc in previous:
            client.delete(COLLECTION, points_selector=models.FilterSelector(filter=models.Filter(
                must=[models.FieldCondition(key="doc", match=models.MatchValue(value=doc))])))
            counts["changed"] += 1
        else:
            counts["added"] += 1
        todo.extend(passages)
    for start in range(0, len(todo), 256):
        batch = todo[start:start + 256]
        vectors = encoder.encode([p.embed_text() for p in batch])
        client.upsert(COLLECTION, points=[models.PointStruct(id=point_id(p.id), vector=v.tolist(), payload=_payload(p))
                                          for p, v in zip(batch, vectors)])
        log.info("embedded %d/%d passages", start + len(batch), len(todo))
    counts["embedded_passages"] = len(todo)
    return counts


def main(cfg: IndexConfig) -> Path:
    out = cfg.out.expanduser().resolve()
    docs = read_documents(cfg.docs.expanduser().resolve(), cfg.max_words)
    passages = [p for _, ps in docs.values() for p in ps]
    if not passages:
        raise InputError(f"--docs {str(cfg.docs)!r}: its documents hold no text")
    previous_info = read_json(out / "index.json") if (out / "index.json").is_file() else None
    rebuild = cfg.rebuild or previous_info is None or previous_info.get("encoder") != cfg.encoder \
        or previous_info.get("qdrant_url") != cfg.qdrant_url
    if previous_info and rebuild and not cfg.rebuild:
        log.info("encoder or store changed since the last index: re-embedding everything")
    encoder = Encoder(cfg.encoder)
    # Update a copy and swap it in whole: a reader never sees a half-updated folder.
    with atomic_dir(out, overwrite=True) as staging:
        if previous_info and not rebuild and (out / "qdrant").is_dir():
            shutil.copytree(out / "qdrant", staging / "qdrant")
        client = open_client(staging / "qdrant", cfg.qdrant_url)
        try:
            counts = update_collection(client, encoder, docs, {} if rebuild else previous_info.get("docs", {}),
                                       rebuild)
        finally:
            client.close()
        with open(staging / "passages.jsonl", "w", encoding="utf-8") as f:
            for p in passages:
                f.write(json.dumps(_payload(p), ensure_ascii=False) + "\n")
        info = {
            **manifest("index", cfg.model_dump(mode="json")),
            "encoder": cfg.encoder, "dim": encoder.dim, "collection": COLLECTION, "qdrant_url": cfg.qdrant_url,
            "documents": len(docs), "passages": len(passages),
            "docs": {doc: {"sha256": sha, "passages": [p.id for p in ps]} for doc, (sha, ps) in docs.items()},
            "min_score": UNCALIBRATED_MIN_SCORE, "calibration": None, "last_update": counts,
        }
        write_json(staging / "index.json", info)
        if cfg.calibration:
            index = KnowledgeIndex(staging, encoder)
            try:
                rows = read_jsonl(cfg.calibration, ("question", "passage_id"))
                unknown = [r["passage_id"] for r in rows if r["passage_id"] and r["passage_id"] not in index.passages]
                if unknown:
                    raise InputError(f"--calibration {str(cfg.calibration)!r} names passages the index does not "
                                     f"hold: {unknown[:5]}")
                info["calibration"] = {**calibrate(index, rows), "file": str(cfg.calibration)}
                info["min_score"] = info["calibration"]["min_score"]
            finally:
                index.close()
            write_json(staging / "index.json", info)
    log.info("indexed %s: %d documents, %d passages (%d unchanged, %d changed, %d added, %d removed; %d passages "
             "embedded); no-relevant-passage threshold %.3f (%s)", out, len(docs), len(passages), counts["unchanged"],
             counts["changed"], counts["added"], counts["removed"], counts["embedded_passages"], info["min_score"],
             "calibrated: balanced accuracy %.3f" % info["calibration"]["balanced_accuracy"]
             if info["calibration"] else "uncalibrated default")
    return out


def dry_run(cfg: IndexConfig) -> str:
    """``--dry-run``: the documents read and split into passages, the calibration file read."""
    docs = read_documents(cfg.docs.expanduser().resolve(), cfg.max_words)
    passages = sum(len(ps) for _, ps in docs.values())
    if not passages:
        raise InputError(f"--docs {str(cfg.docs)!r}: its documents hold no text")
    rows = read_jsonl(cfg.calibration, ("question", "passage_id")) if cfg.calibration else []
    return (f"would index {len(docs)} documents ({passages} passages) with {cfg.encoder} into {cfg.out}"
            + (f", calibrated on {len(rows)} questions" if rows else ""))


def cli(argv: list[str] | None = None) -> None:
    run_cli(IndexConfig, main, argv, prog="slimray index", check=dry_run)


if __name__ == "__main__":
    cli()
