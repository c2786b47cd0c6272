import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from cluster.settings import get_settings
from jobs.artifacts import file_sha256
from jobs.config import ConfigError, parse_args
from jobs.errors import InputError
from jobs.finetune import FinetuneConfig, deepspeed_config, main, run_name


def deepspeed_reads(cfg: FinetuneConfig):
    """What DeepSpeed itself reads from the config slimray generates (one rank: no process group needed)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(deepspeed_config(cfg, use_bf16=False))


def test_zero_stage_from_the_command_line_reaches_deepspeed():
    cfg = parse_args(FinetuneConfig, ["--data", "d", "--out", "o", "--workers", "1", "--zero-stage", "3",
                                      "--batch-size", "8", "--set", "deepspeed.stage3_param_persistence_threshold=0"],
                     "t")
    worker_cfg = FinetuneConfig.model_validate(cfg.model_dump(mode="json"))  # as train_loop_config carries it
    ds = deepspeed_reads(worker_cfg)
    # ZeRO-3 with threshold 0: DeepSpeed partitions every parameter, however small.
    assert ds.zero_optimization_stage == 3 and ds.zero_config.param_persistence_threshold == 0
    assert ds.train_micro_batch_size_per_gpu == 8 and ds.train_batch_size == 8
    assert ds.bfloat16_config.enabled is False


def test_extra_is_deep_merged_and_keeps_what_slimray_sets():
    ds = deepspeed_reads(FinetuneConfig(data="d", out="o", workers=1, zero_stage=3, deepspeed={
        "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000,
        "extra": {"zero_optimization": {"stage3_max_live_parameters": 1000}, "zero_allow_untested_optimizer": True}}))
    # A shallow merge replaced the whole zero_optimization section: stage 0, threshold and bucket lost.
    assert ds.zero_optimization_stage == 3
    assert ds.zero_config.param_persistence_threshold == 0 and ds.zero_config.reduce_bucket_size == 1000
    assert ds.zero_config.max_live_parameters == 1000 and ds.zero_allow_untested_optimizer is True


def test_offload_reaches_deepspeed_with_extra_sub_keys():
    ds = deepspeed_reads(FinetuneConfig(data="d", out="o", workers=1, zero_stage=2, deepspeed={
        "offload_optimizer": True, "extra": {"zero_optimization": {"offload_optimizer": {"pin_memory": True}}}}))
    assert ds.zero_optimization_stage == 2
    assert ds.zero_config.offload_optimizer.device == "cpu" and ds.zero_config.offload_optimizer.pin_memory is True


def test_extra_may_repeat_what_slimray_sets():
    cfg = FinetuneConfig(data="d", out="o", workers=2, batch_size=8, zero_stage=2,
                         deepspeed={"extra": {"train_batch_size": 16, "zero_optimization": {"stage": 2}}})
    assert deepspeed_config(cfg, use_bf16=False)["train_batch_size"] == 16


@pytest.mark.parametrize("options, message", [
    ({"zero_stage": 1, "deepspeed": {"offload_optimizer": True}},
     "offload_optimizer=true has no effect at ZeRO-1 .*use --zero-stage 2 or 3"),
    ({"zero_stage": 2, "deepspeed": {"stage3_param_persistence_threshold": 0}},
     "stage3_param_persistence_threshold=0 has no effect at ZeRO-2: use --zero-stage 3"),
    ({"zero_stage": 3, "deepspeed": {"extra": {"zero_optimization": {"stage": 2}}}},
     "deepspeed.extra sets zero_optimization.stage=2, but slimray sets it to 3 .*use --zero-stage"),
    ({"batch_size": 8, "workers": 2, "deepspeed": {"extra": {"train_batch_size": 64}}},
     "train_batch_size=64, but slimray sets it to 16 .*use --batch-size and --workers"),
    ({"deepspeed": {"extra": {"zero_optimization": 3}}}, "deepspeed.extra removes zero_optimization.stage"),
    ({"zero_stage": 2, "deepspeed": {"extra": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}}},
     "offload_optimizer=.*'device': 'cpu'.*optimizer offload is off: use --set deepspeed.offload_optimizer=true"),
    ({"zero_stage": 2, "deepspeed": {"extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}},
     "stage3_param_persistence_threshold=0, but slimray sets it to None .*ZeRO-3 only"),
    ({"deepspeed": {"extra": {"bf16": {"enabled": True}}}}, "bf16.enabled=True.*use --gpu"),
    ({"deepspeed": {"extra": {"gradient_clipping": 5.0}}}, "gradient_clipping=5.0.*use --grad-clip"),
])
def test_settings_deepspeed_would_ignore_or_that_contradict_an_option_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message) as e:
        FinetuneConfig(data="d", out="o", **options)
    assert e.value.errors()[0]["loc"] == ("deepspeed",)


def test_rejected_deepspeed_settings_fail_the_command_line_with_the_fix():
    with pytest.raises(ConfigError, match=r"deepspeed: .*offload_optimizer=true has no effect at ZeRO-0.*"
                                          r"\(got \{'offload_optimizer': True\}\)"):
        parse_args(FinetuneConfig, ["--data", "d", "--out", "o", "--zero-stage", "0",
                                    "--set", "deepspeed.offload_optimizer=true"], "t")
    with pytest.raises(ConfigError, match="fail_after_step.*unknown key"):  # no test hooks in the product
        parse_args(FinetuneConfig, ["--data", "d", "--out", "o", "--set", "fail_after_step=4"], "t")


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
    # Resumed after the injected failure, from the step-2 checkpoint, and ran to the end.
    assert metrics["restarts"] == 1 and metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
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
    # No C++ op was compiled for training (DeepSpeed's shared-memory all-reduce used to be: up to 2 minutes).
    compiled = list(get_settings().torch_extensions_dir.iterdir())
    assert not compiled, f"DeepSpeed compiled ops during training: {compiled}"
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


def test_default_epochs_come_from_the_data():
    from jobs.finetune import MAX_EPOCHS, MIN_EPOCHS, default_epochs

    assert default_epochs(8997, 77) == 9  # BANKING77: 117 texts per label
    assert default_epochs(15000, 150) == 10  # 100 texts per label need more passes than 117
    assert default_epochs(300_000, 10) == MIN_EPOCHS  # plenty of data: a few passes
    assert default_epochs(200, 50) == MAX_EPOCHS  # 4 texts per label: capped
    assert default_epochs(0, 5) == MAX_EPOCHS  # never divides by zero


def test_a_taggers_default_epochs_come_from_its_rarest_entity_type():
    from jobs.finetune import MAX_EPOCHS, MIN_EPOCHS, default_tagging_epochs

    assert default_tagging_epochs({"person": 641, "product": 135}) == 8  # WNUT-17 train
    assert default_tagging_epochs({"PER": 6600, "MISC": 3438}) == MIN_EPOCHS  # CoNLL-2003-sized
    assert default_tagging_epochs({"x": 3}) == default_tagging_epochs({}) == MAX_EPOCHS


def test_prepare_writes_train_in_a_seeded_order_that_mixes_labels(tmp_path):
    from jobs.prepare import PrepareConfig, main, read_split

    rows = [f"text number {i} about {lab}" for lab in ("a", "b", "c", "d") for i in range(30)]
    src = tmp_path / "sorted.csv"
    src.write_text("text,label\n" + "".join(f"{t},{t.split()[-1]}\n" for t in rows), encoding="utf-8")
    labels = []
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(labels)}"
        main(PrepareConfig(source=str(src), out=out, seed=seed, tokenizer="minilm"))
        labels.append(read_split(out, "train", ("text", "label"))["label"])
    assert labels[0] == labels[1] != labels[2]
    assert len(set(labels[0][:12])) >= 3  # the first rows already hold most labels, not one
