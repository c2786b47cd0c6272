"""The whole path on a real 2-node cluster (`ray start` head + worker, 2 CPUs each), through the product's own
commands: `slimray submit` prepare, a 2-worker ZeRO-3 fine-tune with one worker per node (STRICT_SPREAD),
`slimray jobs` status / logs / list on those jobs, then `serve deploy` of the fine-tuned model and one request.
(The submit round trip shares this cluster rather than starting its own. The compression search is not run
here: both nodes share this machine's disk, so a 2-node search shows nothing that the embedded searches of
tests/test_compress.py and tests/test_run.py do not.)"""

import json
import subprocess
import time

import httpx
import pytest
import yaml

from raycluster import BIN, free_port, ray_cluster, slimray  # tests/raycluster.py
from serve_app.run import SERVE_CONFIG

SAMPLE = SERVE_CONFIG.parent.parent / "jobs" / "samples" / "harbor_bank"


def serve_config(model, data, port: int) -> dict:
    """The repo's Serve YAML with the test's model and data, HTTP on 127.0.0.1:port and one proxy: both nodes
    share this machine's loopback, so a second proxy could not bind the same port."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["proxy_location"] = "HeadOnly"
    (app,) = config["applications"]
    app["args"].update(model=str(model), data=str(data))
    cpus = [d["ray_actor_options"]["num_cpus"] for d in app["deployments"]]
    assert all(0 < c < 1 for c in cpus), cpus  # fractional CPUs, from the repo's YAML
    return config


@pytest.mark.integration
def test_two_nodes_prepare_finetune_and_serve(isolated_network, tiny_encoder, tmp_path):
    data, ft = tmp_path / "data", tmp_path / "ft"
    t0 = time.monotonic()
    # SLIMRAY_STORAGE_ROOT must be reachable from both nodes: one machine, so any absolute path is.
    with ray_cluster(nodes=2, num_cpus=2, memory=3_000_000_000, object_store_memory=200_000_000,
                     env={"SLIMRAY_STORAGE_ROOT": str(tmp_path / "storage")}) as cluster:
        cluster_nodes = {n["node_id"] for n in cluster.nodes()}
        assert len(cluster_nodes) == 2

        address, env = cluster.dashboard, cluster.env

        def submit(*args: str, timeout: int, cwd=None) -> str:
            r = slimray("submit", "--address", address, *args, env=env, timeout=timeout, cwd=cwd)
            assert r.returncode == 0, f"{args[0]}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
            return r.stdout

        # prepare, with a relative --out made absolute by --resolve-paths
        prepare_id = submit("--resolve-paths", "prepare", "--source", str(SAMPLE), "--out", data.name,
                            "--limit", "64", timeout=300, cwd=tmp_path).splitlines()[0]
        assert (data / "train.parquet").is_file() and (data / "labels.json").is_file()
        log = submit("finetune", "--data", str(data), "--out", str(ft), "--model", str(tiny_encoder),
                     "--workers", "2", "--zero-stage", "3", "--placement-strategy", "STRICT_SPREAD",
                     "--cpus-per-worker", "1", "--max-steps", "2", "--batch-size", "8", "--log-every", "1",
                     "--set", "deepspeed.stage3_param_persistence_threshold=0", timeout=900)
        assert "step 2/2" in log  # followed as it ran
        finetune_id = log.splitlines()[0]
        metrics = json.loads((ft / "metrics.json").read_text())
        per_rank = metrics["distributed"]["per_rank"]
        assert sorted(r["rank"] for r in per_rank) == [0, 1]
        assert {r["node_id"] for r in per_rank} == cluster_nodes  # one training worker on each node
        assert (tmp_path / "storage" / "ray_train").is_dir()  # the job got the storage setting

        # `slimray jobs` against the same head: status, logs, list; a wrong token and an unknown job refused
        r = slimray("jobs", "status", finetune_id, "--address", address, env=env)
        assert r.returncode == 0 and r.stdout.startswith(f"{finetune_id}: SUCCEEDED")
        r = slimray("jobs", "logs", finetune_id, "--address", address, env=env)
        assert r.returncode == 0 and "step 1/2" in r.stdout and "step 2/2" in r.stdout
        r = slimray("jobs", "list", "--address", address, env=env)
        assert r.returncode == 0 and prepare_id in r.stdout and f"{finetune_id}  SUCCEEDED" in r.stdout
        r = slimray("jobs", "status", finetune_id, "--address", address, env={**env, "RAY_AUTH_TOKEN": "garbage"})
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip() == (f"slimray jobs status: error: the Ray cluster at {address} rejected the auth "
                                    "token from RAY_AUTH_TOKEN: set it to the cluster's token; `ray get-auth-token` "
                                    "on the head node prints it")
        r = slimray("jobs", "logs", "slimray-nope", "--address", address, env=env)
        assert r.returncode == 2 and "no job 'slimray-nope'" in r.stderr

        port = free_port()
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config(ft, data, port)))
        r = subprocess.run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", cluster.dashboard],
                           env=cluster.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        answer = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # replicas start after deploy returns
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/assist", json={"message": "I lost my card"},
                                    timeout=30)
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert answer is not None and answer.status_code == 200, answer.text if answer is not None else "no answer"
        labels = json.loads((data / "labels.json").read_text())
        assert answer.json()["intent"] in labels
    print(f"2-node cluster path: {time.monotonic() - t0:.0f} s")
