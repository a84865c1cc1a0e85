"""deploy/k8s: every manifest renders, passes an offline schema validation, and wires up what it claims.

Why offline schemas: no cluster in CI. Built-in kinds are checked with
kubernetes-validate's strict schemas (Kubernetes 1.32 OpenAPI, unknown fields
rejected); the Prometheus Operator kinds with the strict JSON Schemas vendored
in tests/schemas (see generate_crd_schemas.py there). The negative tests prove
that a broken manifest really fails.

Kustomize: the overlays are rendered by a small renderer that implements the
subset of kustomize they use (resources, labels, images, JSON 6902 patches)
and fails on anything else; when ``kubectl`` is on PATH its built-in kustomize
renders them too and both must agree.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.32"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "tls": K8S / "overlays" / "tls",  # TLS (issue 13)
    "calibration": K8S / "calibration",
}
_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "labels", "images", "patches"}


# --- a minimal kustomize ------------------------------------------------------------------------


def _json_pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def _apply_json6902(document: dict, operations: list[dict]) -> None:
    for operation in operations:
        *parents, last = _json_pointer(operation["path"])
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op == "add":
                node.insert(index, copy.deepcopy(operation["value"]))
            elif op == "replace":
                node[index] = copy.deepcopy(operation["value"])
            elif op == "remove":
                del node[index]
            else:
                raise AssertionError(f"unsupported patch op {op}")
        else:
            if op in ("add", "replace"):
                if op == "replace":
                    assert last in node, f"replace of missing {operation['path']}"
                node[last] = copy.deepcopy(operation["value"])
            elif op == "remove":
                del node[last]
            else:
                raise AssertionError(f"unsupported patch op {op}")


def _set_image(container: dict, images: list[dict]) -> None:
    name, _, tag = container["image"].partition(":")
    for image in images:
        if image["name"] == name:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def render(directory: Path) -> list[dict]:
    """Render a kustomization directory (the subset of kustomize deploy/k8s uses)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - _SUPPORTED_KEYS
    assert not unsupported, f"{directory}: kustomization keys {unsupported} not supported by the test renderer"
    documents: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            documents.extend(render(path))
        else:
            documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(operations, list), "only JSON 6902 patches are supported"
        matched = [d for d in documents if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matched) == 1, f"patch target {target} matched {len(matched)} resources"
        _apply_json6902(matched[0], operations)
    for label in kustomization.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for document in documents:
            document["metadata"].setdefault("labels", {}).update(label["pairs"])
    images = kustomization.get("images", [])
    for document in documents:
        spec = document.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            _set_image(container, images)
    return documents


def _by_key(documents: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert len(keyed) == len(documents), "duplicate kind/name"
    return keyed


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[tuple[str, str], dict]]:
    return {name: _by_key(render(path)) for name, path in KUSTOMIZATIONS.items()}


# --- schema validation --------------------------------------------------------------------------


def validate(document: dict) -> None:
    """Raise if ``document`` does not pass its strict schema."""
    if document["apiVersion"].startswith("monitoring.coreos.com/"):
        path = SCHEMAS / f"{document['kind'].lower()}-monitoring-{document['apiVersion'].split('/')[1]}.json"
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator(schema).validate(document)
        return
    if document["apiVersion"].startswith("cert-manager.io/"):  # TLS overlay (issue 13)
        path = SCHEMAS / f"{document['kind'].lower()}-cert-manager-{document['apiVersion'].split('/')[1]}.json"
        jsonschema.Draft202012Validator(json.loads(path.read_text())).validate(document)
        return
    import kubernetes_validate

    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_manifest_passes_strict_schema_validation(rendered, name):
    for key, document in rendered[name].items():
        try:
            validate(document)
        except Exception as error:  # noqa: BLE001 - report which manifest
            pytest.fail(f"{name}: {key} fails validation: {getattr(error, 'message', error)}")


def _mutations():
    def typo(d):
        d["spec"]["template"]["spec"]["containers"][1]["imagePullPolicyy"] = "Always"

    def wrong_type(d):
        d["spec"]["replicas"] = "two"

    def bad_probe(d):
        d["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]["grpc"] = {"port": "grpc-port-name"}

    def no_containers_name(d):
        del d["spec"]["template"]["spec"]["containers"][0]["name"]

    return [typo, wrong_type, bad_probe, no_containers_name]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_a_broken_deployment_fails_validation(rendered, mutate):
    broken = copy.deepcopy(rendered["base"][("Deployment", "advsentry")])
    validate(copy.deepcopy(broken))
    mutate(broken)
    with pytest.raises(Exception):  # noqa: B017 - jsonschema or kubernetes-validate error
        validate(broken)


def test_broken_operator_resources_fail_validation(rendered):
    monitor = copy.deepcopy(rendered["base"][("PodMonitor", "advsentry")])
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    rule = copy.deepcopy(rendered["base"][("PrometheusRule", "advsentry")])
    rule["spec"]["groups"][0]["rules"][0]["expression"] = rule["spec"]["groups"][0]["rules"][0].pop("expr")
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_test_renderer_agrees_with_kubectl_kustomize(rendered, name):
    result = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0 and "kustomize" in result.stderr and "unknown command" in result.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert result.returncode == 0, result.stderr
    assert _by_key([d for d in yaml.safe_load_all(result.stdout) if d]) == rendered[name]


# --- what the manifests wire up -------------------------------------------------------------------


def _containers(deployment: dict) -> dict[str, dict]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def _settings_yaml(rendered_set) -> dict:
    return yaml.safe_load(rendered_set[("ConfigMap", "advsentry-settings")]["data"]["settings.yaml"])


def test_pod_is_triton_plus_sidecar_and_only_the_sidecar_is_exposed(rendered):
    base = rendered["base"]
    deployment = base[("Deployment", "advsentry")]
    containers = _containers(deployment)
    assert set(containers) == {"triton", "advsentry"}
    triton, sidecar = containers["triton"], containers["advsentry"]
    # Triton: gRPC on loopback, HTTP off, its gRPC port not declared.
    assert "--grpc-address=127.0.0.1" in triton["args"] and "--allow-http=false" in triton["args"]
    grpc_port = next(a.split("=")[1] for a in triton["args"] if a.startswith("--grpc-port="))
    assert all(p["containerPort"] != int(grpc_port) for p in triton.get("ports", []))
    assert _settings_yaml(base)["upstream"] == f"127.0.0.1:{grpc_port}"
    # The Service selects the pod and exposes exactly the sidecar's gRPC port.
    service = base[("Service", "advsentry")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
    sidecar_ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert sidecar_ports == {"grpc": _settings_yaml(base)["port"], "metrics": _settings_yaml(base)["metrics_port"]}
    for container in deployment["spec"]["template"]["spec"]["containers"] + deployment["spec"]["template"]["spec"]["initContainers"]:
        assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_probes_use_grpc_health(rendered):
    containers = _containers(rendered["base"][("Deployment", "advsentry")])
    sidecar, triton = containers["advsentry"], containers["triton"]
    assert sidecar["readinessProbe"]["grpc"]["port"] == 8001
    live = sidecar["livenessProbe"]["exec"]["command"]
    assert live[:3] == ["python", "-m", "service.health_probe"] and "--live" in live
    for probe in ("startupProbe", "livenessProbe"):
        command = triton[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "service.health_probe"] and "--triton" in command


def test_settings_and_env_are_valid_sidecar_settings(rendered):
    from service.settings import Settings

    base = rendered["base"]
    data = _settings_yaml(base)
    settings = Settings(**data)
    assert settings.upstream and settings.calibration
    for name in ("base", "gpu", "tls"):
        for container in _containers(rendered[name][("Deployment", "advsentry")]).values():
            for env in container.get("env", []):
                if env["name"].startswith("ADVSENTRY_") and container["name"] == "advsentry":
                    field = env["name"].removeprefix("ADVSENTRY_").lower()
                    assert field in Settings.model_fields, f"{env['name']} is not a sidecar setting"


def test_calibration_is_a_hot_reloadable_directory_mount_of_a_valid_artifact(rendered, tmp_path):
    from detector import CalibrationArtifact
    from detector.models import bundled_identity

    base = rendered["base"]
    deployment = base[("Deployment", "advsentry")]
    sidecar = _containers(deployment)["advsentry"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert volumes["calibration"]["configMap"]["name"] == "advsentry-calibration"
    assert "subPath" not in mounts["calibration"], "subPath mounts are never updated: hot reload would break"
    path = Path(_settings_yaml(base)["calibration"])
    assert path.parent == Path(mounts["calibration"]["mountPath"])
    settings_path = next(e["value"] for e in sidecar["env"] if e["name"] == "ADVSENTRY_CONFIG_FILE")
    assert Path(settings_path).parent == Path(mounts["settings"]["mountPath"])
    artifact_file = tmp_path / path.name
    artifact_file.write_text(base[("ConfigMap", "advsentry-calibration")]["data"][path.name])
    artifact = CalibrationArtifact.load(artifact_file)  # schema + checksum
    assert artifact.mismatches(artifact.features, bundled_identity()) == []
    # The init container exports the bundled model with the default maps, so the
    # shipped artifact must read exactly those outputs (else every request fails).
    from detector import DEFAULT_COMBINER, DEFAULT_FEATURES

    assert artifact.features == DEFAULT_FEATURES and artifact.combiner == DEFAULT_COMBINER


def test_pdb_hpa_monitor_and_networkpolicy_point_at_the_pod(rendered):
    base = rendered["base"]
    deployment = base[("Deployment", "advsentry")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert base[("PodDisruptionBudget", "advsentry")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = base[("HorizontalPodAutoscaler", "advsentry")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "advsentry"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert base[("PodDisruptionBudget", "advsentry")]["spec"]["minAvailable"] < hpa["minReplicas"]
    monitor = base[("PodMonitor", "advsentry")]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} == {"metrics", "triton-metrics"} <= ports
    policy = base[("NetworkPolicy", "advsentry")]["spec"]
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {"grpc", "metrics", "triton-metrics"}


def test_overlays_pick_image_variants_and_gpu_resources(rendered):
    cpu = _containers(rendered["cpu"][("Deployment", "advsentry")])
    gpu_deployment = rendered["gpu"][("Deployment", "advsentry")]
    gpu = _containers(gpu_deployment)
    assert all(c["image"].endswith("-cpu") for c in cpu.values())
    assert all(c["image"].endswith("-cuda") for c in gpu.values())
    assert gpu_deployment["spec"]["template"]["spec"]["initContainers"][0]["image"].endswith("-cuda")
    assert gpu["triton"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["advsentry"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "ADVSENTRY_DEVICE", "value": "cuda"} in gpu["advsentry"]["env"]
    assert "--allow-gpu-metrics=true" in gpu["triton"]["args"]
    assert "--gpu" in gpu_deployment["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert "nvidia.com/gpu" not in json.dumps(rendered["cpu"][("Deployment", "advsentry")])


def _shell_flags(command: str, subcommand: str) -> list[str]:
    """The ``--flags`` given to ``advsentry calibrate <subcommand>`` in a shell command line."""
    words = shlex.split(re.sub(r"\$\(\w+\)", "0", command))
    flags: list[str] = []
    for index in range(len(words) - 2):
        if words[index:index + 3] == ["advsentry", "calibrate", subcommand]:
            for word in words[index + 3:]:
                if word in ("&&", ";", "||"):
                    break
                if word.startswith("--"):
                    flags.append(word.split("=")[0])
    assert flags or subcommand == "merge", f"no `advsentry calibrate {subcommand}` in {command!r}"
    return flags


def test_calibration_is_an_indexed_job_followed_by_merge(rendered):
    jobs = rendered["calibration"]
    shards = jobs[("Job", "advsentry-calibration-shards")]["spec"]
    merge = jobs[("Job", "advsentry-calibration-merge")]["spec"]
    assert shards["completionMode"] == "Indexed" and shards["completions"] == shards["parallelism"]
    count = shards["completions"]
    container = shards["template"]["spec"]["containers"][0]
    command = container["args"][0]
    assert f"--shard $(SHARD_INDEX)/{count}" in command
    index_env = next(e for e in container["env"] if e["name"] == "SHARD_INDEX")
    assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    wait = merge["template"]["spec"]["initContainers"][0]
    assert {"name": "SHARDS", "value": str(count)} in wait["env"]
    merge_command = merge["template"]["spec"]["containers"][0]["args"][0]
    assert "calibrate merge /calibration-work/shards/*" in merge_command and "--out /artifacts/calibration.json" in merge_command
    claims = {v["persistentVolumeClaim"]["claimName"] for job in (shards, merge)
              for v in job["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {name for kind, name in jobs if kind == "PersistentVolumeClaim"}


def test_calibration_job_flags_exist_in_the_calibrate_cli(rendered):
    """The Jobs call the real CLI: every flag they pass is an option of that subcommand."""
    from service.commands import calibrate
    import typer.main

    group = typer.main.get_command(calibrate.calibrate_app)
    jobs = rendered["calibration"]
    commands = [jobs[("Job", "advsentry-calibration-shards")]["spec"]["template"]["spec"]["containers"][0]["args"][0],
                jobs[("Job", "advsentry-calibration-merge")]["spec"]["template"]["spec"]["containers"][0]["args"][0]]
    for subcommand in ("run", "merge", "verify"):
        options = {opt for param in group.commands[subcommand].params for opt in (*param.opts, *param.secondary_opts)}
        for command in commands:
            if f"calibrate {subcommand}" in command:
                unknown = set(_shell_flags(command, subcommand)) - options
                assert not unknown, f"advsentry calibrate {subcommand} has no option(s) {unknown}"


# --- TLS overlay (issue 13) -----------------------------------------------------------------------


def test_tls_overlay_mounts_the_cert_manager_secret_and_turns_on_mtls(rendered):
    from service.settings import Settings

    tls = rendered["tls"]
    deployment = tls[("Deployment", "advsentry")]
    sidecar = _containers(deployment)["advsentry"]
    certificate = tls[("Certificate", "advsentry-tls")]["spec"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert volumes["tls"]["secret"]["secretName"] == certificate["secretName"]
    assert "subPath" not in mounts["tls"], "subPath mounts are never updated: certificate renewals would not arrive"
    env = {e["name"].removeprefix("ADVSENTRY_").lower(): e["value"] for e in sidecar["env"]
           if e["name"].startswith("ADVSENTRY_TLS_")}
    settings = Settings(**env, **{k: v for k, v in _settings_yaml(tls).items()})
    assert settings.tls_require_client_cert and settings.tls_client_ca_file
    for path in (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file):
        assert path.parent == Path(mounts["tls"]["mountPath"])
        assert path.name in ("tls.crt", "tls.key", "ca.crt")  # the keys cert-manager writes
    assert {"server auth", "client auth"} <= set(certificate["usages"])
    assert certificate["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
    # Probes: the kubelet's gRPC probe cannot do TLS; the exec probes present the pod's certificate.
    assert "grpc" not in sidecar["readinessProbe"]
    from service import health_probe

    for probe in ("readinessProbe", "livenessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "service.health_probe"]
        flags = {k: v for k, v in zip(command[3:], command[4:]) if k.startswith("--") and not v.startswith("--")}
        assert flags["--cert-file"] == str(settings.tls_cert_file) and flags["--key-file"] == str(settings.tls_key_file)
        assert flags["--ca-file"] == str(settings.tls_client_ca_file)
        assert flags["--server-name"] in certificate["dnsNames"]
        with pytest.raises(SystemExit) as parsed:  # every flag exists in the probe's parser
            health_probe.main([*command[3:], "--help"])
        assert parsed.value.code == 0


def test_a_broken_certificate_fails_validation(rendered):
    certificate = copy.deepcopy(rendered["tls"][("Certificate", "advsentry-tls")])
    validate(copy.deepcopy(certificate))
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    with pytest.raises(jsonschema.ValidationError):
        validate(certificate)
    certificate = copy.deepcopy(rendered["tls"][("Certificate", "advsentry-tls")])
    certificate["spec"]["usages"].append("serverauth")
    with pytest.raises(jsonschema.ValidationError):
        validate(certificate)
