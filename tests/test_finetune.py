import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.artifacts import file_sha256
from jobs.errors import InputError
from jobs.finetune import FinetuneConfig, deepspeed_config, main, run_name


def test_deepspeed_config_from_options():
    cfg = FinetuneConfig(data="d", out="o", zero_stage=3, batch_size=8,
                         deepspeed={"stage3_param_persistence_threshold": 0, "extra": {"zero_allow_untested_optimizer": True}})
    ds = deepspeed_config(cfg, world_size=2, use_bf16=False)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero_allow_untested_optimizer"] is True and ds["bf16"] == {"enabled": False}


def test_run_name_is_stable_and_changes_with_config():
    a = FinetuneConfig(data="d", out="o")
    assert run_name(a) == run_name(FinetuneConfig(data="d", out="o", overwrite=True))
    assert run_name(a) != run_name(FinetuneConfig(data="d", out="o", lr=1e-3))


def test_bad_inputs_fail_before_ray_starts(tmp_path, sample_data):
    with pytest.raises(InputError, match="not a prepared data folder"):
        main(FinetuneConfig(data=tmp_path, out=tmp_path / "o"))
    with pytest.raises(InputError, match="model path '/no/such/model' does not exist"):
        main(FinetuneConfig(data=sample_data, out=tmp_path / "o", model="/no/such/model"))
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_zero3_run_shards_resumes_and_exports_a_loadable_model(finetuned, sample_data):
    metrics = json.loads((finetuned / "metrics.json").read_text())
    # Resumed after the injected failure, from the step-4 checkpoint, and ran to the end.
    assert metrics["restarts"] == 1 and metrics["resumed_from_step"] == 4 and metrics["steps"] == 8
    # ZeRO-3 really shards: each rank holds about half of every parameter (reported from inside the workers).
    ranks = metrics["distributed"]["per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert 0.49 <= r["param_fraction_min"] <= r["param_fraction_max"] <= 0.51
        assert abs(r["param_numel_local"] / r["param_numel_total"] - 0.5) < 0.01
        assert r["optimizer_state_bytes"] > 0
    # The artifact describes itself.
    for key in ("accuracy", "macro_f1", "per_class", "validation", "train_samples_per_s", "wall_s"):
        assert key in metrics
    assert metrics["split"] == "test" and 0 <= metrics["accuracy"] <= 1
    history = [json.loads(line) for line in (finetuned / "history.jsonl").read_text().splitlines()]
    assert any("loss" in h for h in history) and any("val_accuracy" in h for h in history)
    manifest = json.loads((finetuned / "manifest.json").read_text())
    assert manifest["data_manifest_sha256"] == file_sha256(sample_data / "manifest.json")
    assert (finetuned / "finetune_config.yaml").read_text().startswith("# Resolved config")
    assert (finetuned / "model.safetensors").stat().st_size > 1_000_000
    # Anyone can load it: a plain Python process with transformers alone.
    labels = json.loads((sample_data / "labels.json").read_text())
    code = (
        "import sys, json; from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T;"
        "m = M.from_pretrained(sys.argv[1]); t = T.from_pretrained(sys.argv[1]);"
        "p = m(**t(['my new card still has not arrived'], return_tensors='pt')).logits.argmax(-1).item();"
        "print(json.dumps([m.config.id2label[i] for i in range(m.config.num_labels)] + [m.config.id2label[p]]))"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code, str(finetuned)], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert out[:-1] == labels and out[-1] in labels


@pytest.mark.integration
def test_evaluate_and_predict_on_the_finetuned_model(finetuned, sample_data, tmp_path):
    from jobs.evaluate import EvaluateConfig
    from jobs.evaluate import main as evaluate_main
    from jobs.predict import PredictConfig
    from jobs.predict import main as predict_main

    with pytest.raises(InputError, match="must not be the model folder"):
        evaluate_main(EvaluateConfig(model=finetuned, data=sample_data, out=finetuned))
    m = evaluate_main(EvaluateConfig(model=finetuned, data=sample_data, split="test", out=tmp_path / "eval"))
    stored = json.loads((finetuned / "metrics.json").read_text())
    assert m["n"] == stored["n"] and abs(m["accuracy"] - stored["accuracy"]) < 1e-6
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"] == m["accuracy"]

    src = pq.read_table(sample_data / "test.parquet").select(["text"]).slice(0, 50)
    pq.write_table(src, tmp_path / "in.parquet")
    predict_main(PredictConfig(model=finetuned, input=tmp_path / "in.parquet", output=tmp_path / "pred.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == src.column("text").to_pylist()  # order kept
    labels = set(json.loads((sample_data / "labels.json").read_text()))
    assert all(r["label"] in labels and 0 < r["score"] <= 1 for r in rows)
