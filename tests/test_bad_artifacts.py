"""Damaged or inconsistent model folders are refused at load with one line naming the file, before any
weights are deserialised (``jobs.modeling.check_model_folder``): every backend, and the CLI's exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.errors import InputError

REPO = Path(__file__).resolve().parent.parent
LABELS = ["card_lost", "refund", "balance"]


@pytest.fixture(scope="module")
def artifacts(tiny_encoder, tmp_path_factory) -> dict[str, Path]:
    """The same tiny classifier as a fine-tune writes it (safetensors + manifest with file records), and as
    the compression search writes it with each backend (slimray_model.json with file records)."""
    from jobs.artifacts import file_records, write_json
    from jobs.modeling import load_pretrained_for_training, load_tokenizer
    from tuning.methods import Candidate, save_candidate

    root = tmp_path_factory.mktemp("artifacts")
    model = load_pretrained_for_training(str(tiny_encoder), LABELS, "AutoModelForSequenceClassification").eval()
    tokenizer = load_tokenizer(tiny_encoder)
    ft = root / "ft"
    model.save_pretrained(ft, safe_serialization=True)
    tokenizer.save_pretrained(ft)
    write_json(ft / "manifest.json", {"stage": "finetune", "max_length": 16, "files": file_records(ft)})
    found = {"torch": ft}
    for backend in ("onnx-int8", "torch-int8"):
        found[backend] = root / backend
        save_candidate(Candidate(model=model, tokenizer=tokenizer, int8_backend=backend), found[backend], 16)
    return found


def damaged(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / src.name
    shutil.copytree(src, out)
    return out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("backend", ["torch", "onnx-int8", "torch-int8"])
def test_an_intact_artifact_loads_and_its_records_name_every_file_a_loader_reads(artifacts, backend):
    from jobs.inference import load_inference_model
    from jobs.modeling import MODEL_INFO

    path = artifacts[backend]
    info = json.loads((path / (MODEL_INFO if backend != "torch" else "manifest.json")).read_text())
    weights = {"torch": "model.safetensors", "onnx-int8": "model.onnx", "torch-int8": "model_int8.pt"}[backend]
    assert {weights, "config.json", "tokenizer.json"} <= set(info["files"])
    model = load_inference_model(path)
    assert model.labels == LABELS and model.logits(["i lost my card"]).shape == (1, 3)


@pytest.mark.parametrize("backend,weights", [("torch", "model.safetensors"), ("onnx-int8", "model.onnx"),
                                             ("torch-int8", "model_int8.pt")])
def test_truncated_or_altered_weights_are_refused_naming_the_file(artifacts, backend, weights, tmp_path):
    from jobs.inference import load_inference_model

    path = damaged(artifacts[backend], tmp_path)
    truncate(path / weights)
    with pytest.raises(InputError, match=rf"{weights}: \d+ bytes, but .* records \d+ \(truncated"):
        load_inference_model(path)
    # The same size, other bytes: the hash catches it.
    shutil.copy2(artifacts[backend] / weights, path / weights)
    with open(path / weights, "r+b") as f:
        f.seek(f.seek(0, 2) // 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(InputError, match=rf"{weights}: sha256 does not match"):
        load_inference_model(path)


@pytest.mark.parametrize("backend,weights", [("torch", "model.safetensors"), ("onnx-int8", "model.onnx")])
def test_damaged_weights_without_a_record_are_refused_by_their_loader(artifacts, backend, weights, tmp_path):
    """A plain Hugging Face folder (no record) or a record removed: the loader's own error, in one line."""
    from jobs.inference import load_inference_model
    from jobs.modeling import MODEL_INFO

    path = damaged(artifacts[backend], tmp_path)
    record = path / ("manifest.json" if backend == "torch" else MODEL_INFO)
    info = json.loads(record.read_text())
    info.pop("files")
    record.write_text(json.dumps(info))
    truncate(path / weights)
    with pytest.raises(InputError, match=rf"{weights}: cannot be loaded") as err:
        load_inference_model(path)
    assert "\n" not in str(err.value)


def test_a_missing_tokenizer_is_refused_not_looked_up_elsewhere(artifacts, tmp_path):
    from jobs.inference import load_inference_model

    path = damaged(artifacts["onnx-int8"], tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(InputError, match=r"tokenizer.json: missing \(listed in"):
        load_inference_model(path)
    info = json.loads((path / "slimray_model.json").read_text())
    info["files"].pop("tokenizer.json")
    (path / "slimray_model.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="no tokenizer files"):
        load_inference_model(path)


def test_shapes_that_do_not_match_the_weights_are_refused(artifacts, tmp_path):
    from jobs.inference import load_inference_model

    path = damaged(artifacts["torch"], tmp_path)
    (path / "manifest.json").unlink()  # no record: the shapes check itself must refuse it
    info = {"backend": "torch", "weights": "model.safetensors", "max_length": 16,
            "layer_shapes": [{"heads": 6, "ffn": 1000}, {"heads": 12, "ffn": 1536}]}
    (path / "slimray_model.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"model.safetensors: its tensors do not match the shapes"):
        load_inference_model(path)


@pytest.mark.parametrize("backend,name,content", [("onnx-int8", "config.json", b"{not json"),
                                                  ("onnx-int8", "slimray_model.json", b"\xff\xfe\x00binary"),
                                                  ("torch", "manifest.json", b"[1, 2")])
def test_unparsable_json_is_refused_naming_the_file(artifacts, backend, name, content, tmp_path):
    from jobs.inference import load_inference_model

    path = damaged(artifacts[backend], tmp_path)
    (path / name).write_bytes(content)
    with pytest.raises(InputError, match=rf"{name}: not a valid JSON file"):
        load_inference_model(path)


def test_the_cli_refuses_a_damaged_model_in_one_line(artifacts, sample_data, tmp_path):
    path = damaged(artifacts["torch"], tmp_path)
    truncate(path / "model.safetensors")
    r = subprocess.run([sys.executable, "-m", "slimray", "evaluate", "--model", str(path), "--data", str(sample_data)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "model.safetensors" in errors[0] and "truncated" in errors[0], r.stderr[-2000:]
