"""The knowledge index, generation records and decoding, and the fine-tune of a causal LM (--task generation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import generation as gen
from jobs.errors import InputError
from jobs.knowledge import (BM25, IndexConfig, KnowledgeIndex, best_threshold, main as index_main, read_documents,
                            recall_at)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "samples" / "harbor_bank"


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fees.md").write_text(
        "# Fees\n\nIntro text about fees.\n\n## International transfers\nSending money abroad costs £5 per "
        "transfer.\n\n## Cash withdrawals\nWithdrawals at any UK cash machine are free.\n", encoding="utf-8")
    (folder / "hours.html").write_text(
        "<html><head><title>Hours</title><style>p{}</style></head><body><h1>Opening hours</h1>"
        "<h2>Branches</h2><p>Branches open 9am to 5pm, Monday to Friday.</p>"
        "<h2>Phone banking</h2><p>Call 0800 123 4567 at any hour.<script>alert(1)</script></p></body></html>",
        encoding="utf-8")
    (folder / "faq.csv").write_text("question,answer\nCan I pay in cheques?,\"Yes, by post or at a branch.\"\n"
                                    "Do you do mortgages?,Our mortgages start at 4.1%.\n", encoding="utf-8")
    (folder / "notes.txt").write_text("First paragraph here.\n\nSecond paragraph here.\n", encoding="utf-8")
    return folder


def test_documents_split_into_passages_with_stable_ids(tmp_path):
    docs = read_documents(write_docs(tmp_path / "docs"), max_words=160)
    ids = {p.id: p for _, ps in docs.values() for p in ps}
    assert set(ids) == {"fees-intro", "fees-international-transfers", "fees-cash-withdrawals", "hours-branches",
                        "hours-phone-banking", "faq-1", "faq-2", "notes-1", "notes-2"}
    assert ids["fees-international-transfers"].title == "Fees - International transfers"
    assert ids["hours-phone-banking"].text == "Call 0800 123 4567 at any hour."  # no script text
    assert ids["faq-2"].title == "Do you do mortgages?" and "4.1%" in ids["faq-2"].text
    # A section longer than max_words is cut into numbered parts.
    long = read_documents(write_docs(tmp_path / "docs2"), max_words=3)
    assert {"fees-international-transfers", "fees-international-transfers-2"} <= {
        p.id for _, ps in long.values() for p in ps}


def test_bad_document_folders_fail_with_one_line(tmp_path):
    with pytest.raises(InputError, match="holds no documents"):
        read_documents(tmp_path, 160)
    (tmp_path / "a.md").write_bytes(b"\xff\xfe binary")
    with pytest.raises(InputError, match="not UTF-8"):
        read_documents(tmp_path, 160)
    (tmp_path / "a.md").write_text("## Fees\nx\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("## Fees\ny\n")
    with pytest.raises(InputError, match="comes from both"):
        read_documents(tmp_path, 160)
    bad = tmp_path / "faq"
    bad.mkdir()
    (bad / "faq.csv").write_text("q_text,reply_text\na,b\n")
    with pytest.raises(InputError, match="question and an answer column"):
        read_documents(bad, 160)


def test_reindexing_embeds_only_changed_documents_and_drops_removed_ones(tmp_path):
    docs, out = write_docs(tmp_path / "docs"), tmp_path / "kb"
    index_main(IndexConfig(docs=docs, out=out))
    first = json.loads((out / "index.json").read_text())
    assert first["passages"] == 9 and first["last_update"]["added"] == 4
    # Nothing changed: nothing embedded.
    index_main(IndexConfig(docs=docs, out=out))
    assert json.loads((out / "index.json").read_text())["last_update"] == {
        "unchanged": 4, "changed": 0, "added": 0, "removed": 0, "embedded_passages": 0}
    # One document edited, one removed.
    (docs / "fees.md").write_text("# Fees\n\n## International transfers\nSending money abroad costs £7.\n")
    (docs / "notes.txt").unlink()
    index_main(IndexConfig(docs=docs, out=out))
    info = json.loads((out / "index.json").read_text())
    assert info["last_update"] == {"unchanged": 2, "changed": 1, "added": 0, "removed": 1, "embedded_passages": 1}
    index = KnowledgeIndex(out)
    try:
        hits = index.search("what does a transfer abroad cost?", k=10)
        assert hits[0].id == "fees-international-transfers" and "£7" in hits[0].text
        assert {h.id for h in hits} == {"fees-international-transfers", "hours-branches", "hours-phone-banking",
                                        "faq-1", "faq-2"}  # the removed and edited-away passages are gone
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    finally:
        index.close()


def test_calibration_threshold_separates_answerable_from_unanswerable_questions():
    assert best_threshold([0.7, 0.8, 0.9], [0.1, 0.2, 0.3]) == (pytest.approx(0.5), 1.0)
    threshold, balanced = best_threshold([0.6, 0.7, 0.4], [0.1, 0.5])
    assert 0.4 < threshold <= 0.6 and balanced == pytest.approx(((2 / 3) + 1) / 2)


def test_the_sample_knowledge_base_is_consistent_with_its_question_sets():
    docs = read_documents(SAMPLE / "knowledge", 160)
    passages = {p.id: p for _, ps in docs.values() for p in ps}
    heldout = [json.loads(line) for line in (SAMPLE / "rag" / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (SAMPLE / "rag" / "train.jsonl").read_text().splitlines()]
    calibration = [json.loads(line) for line in (SAMPLE / "rag" / "calibration.jsonl").read_text().splitlines()]
    assert len(heldout) >= 60
    for row in heldout:  # every reference fact is stated, word for word, in its passage
        assert row["fact"] in passages[row["passage_id"]].text, row
    for row in train + calibration:
        assert row["passage_id"] is None or row["passage_id"] in passages
    questions = [r["question"].lower() for r in heldout + train + calibration]
    assert len(set(questions)) == len(questions)  # held-out questions are never trained on


def test_bm25_baseline_and_recall():
    bm25 = BM25([{"id": "a", "title": "Fees", "text": "international transfer fee £5"},
                 {"id": "b", "title": "Hours", "text": "branches open 9am"}])
    ranked = bm25.search_many(["transfer fee", "when do branches open"], k=2)
    assert [r[0] for r in ranked] == ["a", "b"]
    assert recall_at(["a", "a"], ranked, 1) == 0.5


# ----------------------------------------------------------------------------------------------------------
# Generation: records, prompts, decoding, scores.


@pytest.fixture(scope="module")
def tiny_lm(tiny_causal_lm):
    model = gen.load_causal_lm(str(tiny_causal_lm))
    model.eval()
    return model, gen.load_tokenizer(str(tiny_causal_lm))


RECORD = {"question": "What does a wire abroad cost?",
          "passages": [{"id": "fees-intl", "title": "Fees", "text": "A wire abroad costs £5."},
                       {"id": "hours", "title": "Hours", "text": "Open 9am to 5pm."}],
          "answer": "It costs £5. [fees-intl]"}


def test_training_example_masks_the_prompt_and_drops_passages_that_do_not_fit(tiny_lm):
    _, tok = tiny_lm
    ids, labels = gen.training_example(tok, RECORD, 4096)
    answer = tok.encode(RECORD["answer"], add_special_tokens=False)
    trained = [t for t in labels if t != -100]
    assert trained[:-1] == answer and trained[-1] == tok.convert_tokens_to_ids(tok.eos_token)
    assert ids[-len(trained):] == trained and len(ids) == len(labels)
    assert "[fees-intl] Fees: A wire abroad costs £5." in tok.decode(ids)
    short_ids, short_labels = gen.training_example(tok, RECORD, len(ids) - 5)
    assert "[hours]" not in tok.decode(short_ids) and [t for t in short_labels if t != -100] == trained


def test_answer_only_logits_give_the_same_loss_as_full_logits(tiny_lm):
    import torch

    model, tok = tiny_lm
    rows = [RECORD, {**RECORD, "question": "and a longer question about the same wire abroad cost, please?",
                     "answer": "£5 each. [fees-intl]"}]
    batch = gen.collate(tok, 512, "cpu")({"text": [json.dumps(r) for r in rows]})
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]
    with torch.no_grad():
        kept = model(**batch).loss
        full_labels = torch.full_like(batch["input_ids"], -100)
        full_labels[:, -batch["labels"].shape[1]:] = batch["labels"]
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=full_labels).loss
    assert kept.item() == pytest.approx(full.item(), rel=1e-5)


def test_batched_decoding_matches_one_at_a_time_and_respects_limits(tiny_lm):
    model, tok = tiny_lm
    questions = ["short?", "a much longer question that pads the other prompt on the left side?"]
    passages = [RECORD["passages"], RECORD["passages"][:1]]
    together = gen.generate(model, tok, questions, passages, max_new_tokens=12, batch_size=2)
    alone = [gen.generate(model, tok, [q], [p], max_new_tokens=12, batch_size=1)[0] for q, p in zip(questions, passages)]
    assert [s.tokens for s in together] == [s.tokens for s in alone]
    assert all(len(s.tokens) <= 12 and s.finish_reason in ("stop", "length") for s in together)
    pieces: list[str] = []
    seq = gen.Sequence_(gen.prompt_ids(tok, questions[0], passages[0]), 8, float("inf"), on_text=pieces.append)
    gen.decode_batch(model, tok, [seq])
    assert "".join(pieces) == seq.text  # streamed pieces add up to the answer
    late = gen.Sequence_(gen.prompt_ids(tok, questions[0], passages[0]), 50, 0.0)  # deadline already passed
    gen.decode_batch(model, tok, [late])
    assert late.finish_reason in ("timeout", "stop") and len(late.tokens) <= 1


def test_fact_match_citations_and_bootstrap():
    assert gen.fact_match("Branches open 9 am to 5 pm.", "9am to 5pm")
    assert gen.fact_match("It costs £25, taken monthly.", "£25")
    assert gen.fact_match("Call 0800 123 4567!", "0800 123 4567")
    assert not gen.fact_match("It costs £250.", "£25")
    assert not gen.fact_match("Open at 19am", "9am")
    assert gen.citations("It is £5 [fees-intl]. See also [hours] and [fees-intl].") == ["fees-intl", "hours"]
    assert gen.strip_citations("It is £5. [fees-intl]") == "It is £5."
    ci = gen.paired_bootstrap([0, 0, 1, 0] * 10, [1, 1, 1, 0] * 10)
    assert ci["diff"] == pytest.approx(0.5) and 0 < ci["ci_low"] < 0.5 < ci["ci_high"]


def test_sft_records_put_in_the_answering_passage_and_its_citation():
    class Hit:
        def __init__(self, pid):
            self.id, self.title, self.text = pid, pid.title(), f"text of {pid}"

    passages = {p: {"id": p, "title": p.title(), "text": f"text of {p}"} for p in ("a", "b", "c", "gold")}
    rows = [{"question": "q1", "passage_id": "gold", "answer": "The answer."},
            {"question": "q2", "passage_id": None, "answer": "I can't find that."}]
    records = gen.sft_records(rows, lambda qs, k: [[Hit("a"), Hit("b")] for _ in qs], passages, 2, seed=0)
    assert "gold" in [p["id"] for p in records[0]["passages"]] and records[0]["answer"] == "The answer. [gold]"
    assert records[1]["answer"] == "I can't find that." and len(records[1]["passages"]) == 2
    with pytest.raises(InputError, match="not in the index"):
        gen.sft_records([{**rows[0], "passage_id": "nope"}], lambda qs, k: [[Hit("a")]], passages, 1, 0)


def test_generation_records_are_checked_split_and_deduplicated(tmp_path, tiny_lm):
    _, tok = tiny_lm
    path = tmp_path / "records.jsonl"
    gen.write_jsonl(path, [{**RECORD, "question": f"question {i}?"} for i in range(20)])
    folder, info = gen.prepare_records(path, tmp_path / "store", tok, seed=0)
    assert info["rows"] == {"train": 18, "validation": 2} and info["max_length"] % 64 == 0
    again, _ = gen.prepare_records(path, tmp_path / "store", tok, seed=0)
    assert again == folder  # same content, same folder
    gen.write_jsonl(path, [RECORD, RECORD])
    with pytest.raises(InputError, match="appears twice"):
        gen.prepare_records(path, tmp_path / "store", tok, seed=0)
    gen.write_jsonl(path, [{"question": "q", "passages": "not a list", "answer": "a"}])
    with pytest.raises(InputError, match="'passages' must be a list"):
        gen.prepare_records(path, tmp_path / "store", tok, seed=0)


def test_generation_config_defaults_and_limits():
    from jobs.finetune import FinetuneConfig

    cfg = FinetuneConfig(data="x.jsonl", out="o", task="generation")
    assert (cfg.model, cfg.batch_size, cfg.lr) == ("smollm2", 2, 2e-4)
    assert FinetuneConfig(data="x.jsonl", out="o", task="generation", lora_rank=0).lr == 2e-5
    assert FinetuneConfig(data="x.jsonl", out="o", task="generation", model="m", batch_size=8).batch_size == 8
    with pytest.raises(ValueError, match="at most 512"):
        FinetuneConfig(data="d", out="o", max_length=1024)


# ----------------------------------------------------------------------------------------------------------
# The fine-tune on Ray Train + DeepSpeed ZeRO-3.


@pytest.mark.integration
def test_zero3_lora_finetune_shards_the_lm_resumes_and_exports_merged_and_adapter(ray_session, tiny_causal_lm,
                                                                                   tmp_path):
    from conftest import finetune_with_a_worker_killed

    from jobs.finetune import FinetuneConfig

    data = tmp_path / "records.jsonl"
    gen.write_jsonl(data, [{**RECORD, "question": f"what does wire number {i} cost?"} for i in range(40)])
    out = tmp_path / "gen-model"
    cfg = FinetuneConfig(data=data, out=out, task="generation", model=str(tiny_causal_lm), workers=2, zero_stage=3,
                         max_steps=4, batch_size=2, checkpoint_every=2, log_every=2, max_failures=2,
                         deepspeed={"stage3_param_persistence_threshold": 0})
    finetune_with_a_worker_killed(cfg, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["restarts"] == 1 and metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    for rank in metrics["distributed"]["per_rank"]:  # the causal LM's parameters really are split in two
        assert abs(rank["param_numel_local"] / rank["param_numel_total"] - 0.5) < 0.01
    assert 0 <= metrics["token_accuracy"] <= 1 and metrics["loss"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = gen.load_causal_lm(str(out))  # a plain model folder: no peft needed
    assert type(merged).__name__ == "LlamaForCausalLM" and gen.load_tokenizer(str(out)).chat_template


# ----------------------------------------------------------------------------------------------------------
# The assistant's generative path through the API (an in-process backend), then through the real graph.


class RagBackend:
    """Classifies every message as `fee` with the given confidence; finds passages by word overlap."""

    PASSAGES = [{"id": "fees-intl", "title": "Fees - International", "text": "A wire abroad costs £5.", "doc": "f.md"},
                {"id": "hours", "title": "Hours", "text": "Branches open 9am to 5pm.", "doc": "h.md"}]

    def __init__(self, confidence: float):
        self.confidence, self.composed = confidence, []

    async def classify(self, texts):
        from serve_app.api import Classification

        return Classification(version="v", threshold=0.5, top=[[("fee", self.confidence), ("other", 0.1)]
                                                                for _ in texts])

    async def search(self, query, k):
        from serve_app.api import Search

        words = set(query.lower().split())
        hits = [{**p, "score": len(words & set(p["text"].lower().split())) / 4} for p in self.PASSAGES]
        return Search(sorted(hits, key=lambda h: -h["score"])[:k], min_score=0.25)

    async def compose(self, question, passages):
        self.composed.append([p["id"] for p in passages])
        return {"text": f"It costs £5. [{passages[0]['id']}] [made-up-id]", "finish_reason": "stop"}

    async def compose_stream(self, question, passages):
        for piece in ("It costs", " £5.", f" [{passages[0]['id']}]"):
            yield piece
        yield {"text": f"It costs £5. [{passages[0]['id']}]", "finish_reason": "length"}

    async def describe(self):
        return {}


def _rag_client(confidence: float, search_intent: bool = False):
    import httpx

    from serve_app.api import make_api
    from serve_app.assistant import Playbook

    backend = RagBackend(confidence)
    playbook = Playbook.model_validate({"default": "A colleague will reply.",
                                        "intents": {"fee": {"reply": "See the fee list.", "search": search_intent}}})
    api = make_api(backend, playbook, search=True, generate=True)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test"), backend


def test_assist_answers_from_the_documents_what_the_playbook_cannot_and_hands_off_when_nothing_is_relevant():
    import asyncio

    async def go():
        client, backend = _rag_client(confidence=0.2)  # below the 0.5 threshold
        async with client:
            r = (await client.post("/v1/assist", json={"message": "what does a wire abroad cost"})).json()
            assert r["source"] == "generated" and not r["handoff"] and r["reply"] == "It costs £5."
            assert r["citations"] == [{"id": "fees-intl", "title": "Fees - International", "score": 0.75}]
            assert backend.composed == [["fees-intl"]]  # only passages above the index's threshold
            r = (await client.post("/v1/assist", json={"message": "tell us something funny"})).json()
            assert r["source"] == "handoff" and r["handoff"] and r["handoff_reason"] == "low_confidence"
            assert r["reply"] == "A colleague will reply." and r["citations"] == []
            r = (await client.post("/v1/search", json={"query": "when do branches open", "k": 1})).json()
            assert [p["id"] for p in r["results"]] == ["hours"] and r["relevant"] and r["min_score"] == 0.25
            bad = await client.post("/v1/search", json={"query": "x", "k": 0})
            assert bad.status_code == 422
        client, backend = _rag_client(confidence=0.9)  # confident: the playbook answers...
        async with client:
            r = (await client.post("/v1/assist", json={"message": "what does a wire abroad cost"})).json()
            assert r["source"] == "playbook" and r["reply"] == "See the fee list." and backend.composed == []
        client, backend = _rag_client(confidence=0.9, search_intent=True)  # ...unless its entry says search
        async with client:
            r = (await client.post("/v1/assist", json={"message": "what does a wire abroad cost"})).json()
            assert r["source"] == "generated"
            r = (await client.post("/v1/assist", json={"message": "tell us something funny"})).json()
            assert r["source"] == "playbook" and r["reply"] == "See the fee list."  # nothing relevant: its reply
    asyncio.run(go())


def parse_sse(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_assist_streams_tokens_then_the_whole_answer_as_server_sent_events():
    import asyncio

    async def go():
        client, _ = _rag_client(confidence=0.2)
        async with client:
            r = await client.post("/v1/assist?stream=true", json={"message": "what does a wire abroad cost"})
            assert r.headers["content-type"].startswith("text/event-stream")
            events = parse_sse(r.text)
            assert [e for e, _ in events] == ["token", "token", "token", "done"]
            assert "".join(d["text"] for e, d in events if e == "token") == "It costs £5. [fees-intl]"
            done = events[-1][1]
            assert done["reply"] == "It costs £5." and done["finish_reason"] == "length"
            assert done["citations"][0]["id"] == "fees-intl"
            r = await client.post("/v1/assist?stream=true", json={"message": "tell us something funny"})  # a hand-off
            assert [e for e, _ in parse_sse(r.text)] == ["token", "done"]
            assert parse_sse(r.text)[-1][1]["source"] == "handoff"
    asyncio.run(go())


def check_knowledge_graph(url: str, passages: int, backend: str, max_new_tokens: int) -> None:
    """The knowledge path through a deployed graph whose index was built from ``write_docs`` (9 passages; more
    where more documents were added) and whose playbook searches for every message: search, a generated and cited
    answer, the SSE stream, a hand-off when the documents hold nothing relevant, and what /v1/models says of the
    index and the generator."""
    import httpx

    r = httpx.post(f"{url}/v1/search", json={"query": "how much is a transfer abroad", "k": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "fees-international-transfers"
    r = httpx.post(f"{url}/v1/assist", json={"message": "how much is a transfer abroad?"}, timeout=120).json()
    assert r["source"] == "generated" and r["citations"] and r["finish_reason"] in ("stop", "length")
    with httpx.stream("POST", f"{url}/v1/assist?stream=true", json={"message": "when do branches open?"},
                      timeout=120) as s:
        events = parse_sse("".join(s.iter_text()))
    assert events[-1][0] == "done" and events[-1][1]["source"] == "generated"
    assert "".join(d["text"] for e, d in events[:-1]).strip() != "" or events[-1][1]["reply"]
    r = httpx.post(f"{url}/v1/assist", json={"message": "who won the football last night?"}, timeout=60).json()
    assert r["source"] == "handoff" and r["handoff"]  # nothing relevant in the documents
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert models["knowledge"]["passages"] == passages and models["generator"]["max_new_tokens"] == max_new_tokens
    assert models["generator"]["backend"] == backend


@pytest.mark.integration
def test_graph_with_a_llama_cpp_generator_searches_generates_streams_and_hands_off(ray_session, finetuned,
                                                                                   request, tmp_path):
    """``check_knowledge_graph`` with the llama.cpp backend (optional; tests/test_page.py checks the transformers
    backend on the page's graph)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (CI tests the transformers backend)")
    generator = request.getfixturevalue("tiny_gguf")[0]  # a fine-tune of a GGUF base: converted at deploy
    from ray import serve

    from serve_app.app import AppArgs
    from serve_app.run import deploy
    from raycluster import free_port

    index_main(IndexConfig(docs=write_docs(tmp_path / "docs"), out=tmp_path / "kb"))
    playbook = tmp_path / "playbook.yaml"
    playbook.write_text("default: A colleague will reply.\nintents: {}\n")
    args = AppArgs(model=str(finetuned), index=str(tmp_path / "kb"), generator=str(generator),
                   generator_backend="llama_cpp", playbook=str(playbook), default_threshold=1.0,
                   max_new_tokens=8)  # every message searches
    try:
        check_knowledge_graph(deploy(args, port=free_port()), 9, "llama_cpp", 8)
    finally:
        serve.shutdown()


def test_rag_routes_fuzzed_from_the_openapi_schema_never_answer_5xx():
    import schemathesis
    from test_serve import fuzz_openapi

    client, _ = _rag_client(confidence=0.2)
    fuzz_openapi(schemathesis.openapi.from_asgi("/openapi.json", client._transport.app), max_examples=150)


# ----------------------------------------------------------------------------------------------------------
# The llama.cpp backend: GGUF export (gguf package only) and continuous batching (llama-cpp-python, optional).


def tiny_template(folder: Path, out: Path) -> Path:
    """A GGUF 'base' shaped like the tiny Llama at ``folder``, with SmolLM2's tokenizer metadata (what a real
    base GGUF gives ``write_gguf``): zero weights, to be replaced."""
    import gguf
    import numpy as np

    from jobs.llamacpp import hf_tensors

    config = json.loads((folder / "config.json").read_text())
    packaged = gen.packaged_gguf("smollm2")
    smol = gguf.GGUFReader(Path(packaged[0]) / packaged[1])
    w = gguf.GGUFWriter(out, "llama")
    for f in smol.fields.values():
        if f.name.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, array in hf_tensors(folder).items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.zeros(array.shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_causal_lm, tmp_path_factory):
    """The tiny Llama as a fine-tune of a GGUF base (its manifest names the template) and as f16 GGUF."""
    import shutil

    from jobs.llamacpp import gguf_for

    tmp = tmp_path_factory.mktemp("tiny-gguf")
    folder = tmp / "finetuned"
    shutil.copytree(tiny_causal_lm, folder)
    template = tiny_template(folder, tmp / "base.gguf")
    (folder / "manifest.json").write_text(json.dumps({"base_model_path": str(template)}))
    return folder, gguf_for(str(folder), tmp / "cache", "f16"), template


def test_gguf_export_loads_back_with_the_same_logits_and_is_cached(tiny_gguf, tiny_lm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.llamacpp import gguf_for, write_gguf

    folder, path, template = tiny_gguf
    model, tok = tiny_lm
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([gen.prompt_ids(tok, RECORD["question"], RECORD["passages"])])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, back(input_ids=ids).logits
    assert torch.allclose(want, got, atol=2e-3, rtol=1e-2)  # q/k permuted back, names mapped; f16 rounding only
    stamp = path.stat().st_mtime_ns
    assert gguf_for(str(folder), path.parent, "f16") == path and path.stat().st_mtime_ns == stamp  # cached
    assert not list(path.parent.glob("*.partial"))
    config = json.loads((folder / "config.json").read_text())
    wider = tmp_path / "wider"
    wider.mkdir()
    (wider / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(InputError, match="3 layers"):
        write_gguf(wider, template, tmp_path / "x.gguf")
    with pytest.raises(InputError, match="base is not a GGUF"):
        gguf_for(str(tiny_lm_folder(tiny_gguf)), tmp_path, "f16")
    with pytest.raises(InputError, match="--generator-quant"):
        gguf_for(str(folder), tmp_path, "q3")


def tiny_lm_folder(tiny_gguf) -> Path:
    """The tiny Llama without its manifest: a folder whose base is unknown."""
    folder = tiny_gguf[0].parent / "no-manifest"
    if not folder.exists():
        import shutil

        shutil.copytree(tiny_gguf[0], folder, ignore=shutil.ignore_patterns("manifest.json"))
    return folder


def test_llama_cpp_engine_batches_continuously_cancels_and_refuses_long_prompts(tiny_gguf, tiny_lm):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (CI tests the transformers backend)")
    from jobs.llamacpp import Engine

    _, tok = tiny_lm
    engine = Engine(tiny_gguf[1], tok, slots=2, threads=1, slot_tokens=512)
    prompts = [gen.prompt_ids(tok, f"question {i}?", RECORD["passages"]) for i in range(4)]
    pieces: list[str] = []
    seqs = [gen.Sequence_(p, 6, float("inf"), on_text=pieces.append if i == 0 else None)
            for i, p in enumerate(prompts)]
    assert engine.step(seqs[:2]) == [] and engine.capacity == 0
    with pytest.raises(ValueError, match="slots"):
        engine.step(seqs[2:3])
    seqs[1].cancel()  # its caller went away: the next step frees its slot
    ended = engine.step()
    assert seqs[1] in ended and engine.capacity == 1
    engine.step(seqs[2:3])  # joins while seqs[0] is still decoding
    assert seqs[0].finish_reason is None and seqs[2].first_token_s is not None and len(engine.running) == 2
    engine.run(seqs[3:])
    assert engine.capacity == 2 and not engine.running
    assert all(s.finish_reason in ("stop", "length") and len(s.tokens) <= 6 for s in (seqs[0], seqs[2], seqs[3]))
    assert "".join(pieces) == seqs[0].text
    with pytest.raises(InputError, match="context"):
        engine.check(gen.Sequence_(prompts[0] * 10, 64, float("inf")))
    engine.close()
