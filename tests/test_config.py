from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError, build_config, parse_args, set_dotted
from jobs.evaluate import EvaluateConfig
from jobs.finetune import FinetuneConfig
from jobs.predict import PredictConfig
from jobs.prepare import PrepareConfig
from slimray.run import load_profile, stage_configs
from tuning.compress import CompressConfig

REPO = Path(__file__).resolve().parent.parent
# Every YAML config in the repo names its schema by file-name prefix.
SCHEMAS = {"prepare": PrepareConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig, "predict": PredictConfig,
           "compress": CompressConfig}


def config_files():
    return sorted(REPO.glob("*/configs/*.yaml"))


def test_every_yaml_file_in_the_repository_is_validated_by_a_schema():
    """No config file escapes validation: each tracked YAML outside k8s/ (checked by tests/test_k8s.py) is a
    stage config or run profile (validated below), the sample's playbook or the Serve config (validated here)."""
    import subprocess

    from ray.serve.schema import ServeDeploySchema

    from jobs.config import load_yaml
    from serve_app.assistant import load_playbook

    tracked = subprocess.run(["git", "ls-files", "*.yaml", "*.yml"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    others = {REPO / "jobs/samples/harbor_bank/playbook.yaml", REPO / "serve_app/serve_config.yaml"}
    assert {REPO / t for t in tracked if not t.startswith("k8s/")} == set(config_files()) | others
    assert load_playbook(REPO / "jobs/samples/harbor_bank/playbook.yaml").intents
    assert ServeDeploySchema.model_validate(load_yaml(REPO / "serve_app/serve_config.yaml")).applications


@pytest.mark.parametrize("path", config_files(), ids=lambda p: p.name)
def test_every_config_file_validates(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# slimray ") and str(path.relative_to(REPO)) in first, "open with the command that runs it"
    if path.name.startswith("run_"):  # a `slimray run` profile: every section must make a valid stage config
        profile, where = load_profile(str(path))
        stage_configs(profile, "source", tmp_path, where)
        return
    build_config(SCHEMAS[path.name.split("_")[0]], file=path)


def test_flags_override_file_and_set_overrides_flags(tmp_path):
    f = tmp_path / "ft.yaml"
    f.write_text(yaml.safe_dump({"data": "d", "out": "o", "workers": 4, "deepspeed": {"overlap_comm": True}}))
    cfg = parse_args(FinetuneConfig, ["--config", str(f), "--workers", "3", "--zero-stage", "3",
                                      "--set", "workers=5", "--set", "deepspeed.reduce_bucket_size=1000"], "t")
    assert cfg.workers == 5 and cfg.zero_stage == 3
    assert cfg.deepspeed.overlap_comm is True and cfg.deepspeed.reduce_bucket_size == 1000


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match="zero_stag.*unknown key"):
        build_config(FinetuneConfig, flags={"data": "d", "out": "o"}, overrides=["zero_stag=3"])


def test_bad_value_is_quoted():
    with pytest.raises(ConfigError, match=r"zero_stage.*got 5"):
        parse_args(FinetuneConfig, ["--data", "d", "--out", "o", "--zero-stage", "5"], "t")
    with pytest.raises(ConfigError, match=r"workers.*got 'two'"):
        parse_args(FinetuneConfig, ["--data", "d", "--out", "o", "--workers", "two"], "t")


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="data: Field required"):
        parse_args(FinetuneConfig, ["--out", "o"], "t")


def test_text_fields_stay_text():
    cfg = parse_args(PrepareConfig, ["--source", "123", "--out", "o", "--text-column", "007",
                                     "--column-names", "id,rating,text"], "t")
    assert cfg.source == "123" and cfg.text_column == "007" and cfg.column_names == ["id", "rating", "text"]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        set_dotted({}, "no-equals-sign")
