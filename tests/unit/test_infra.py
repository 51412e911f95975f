"""infra/k8s agrees with the code and survives an apply, an outage and a drain: the KEDA
triggers read the consumers bus/subjects.py builds and the series the scraped pods export, an
apply does not resize what KEDA scales, every pod is probed on ports it declares and locked
down, a disruption budget covers every pool, the variables set are real settings that validate,
and the edges run with API keys on."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import msgspec
import pytest
import yaml

from bus.priorities import PRIORITIES
from bus.subjects import Subjects
from services.settings import ENV, Settings, SettingsError, from_env

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
KINDS = {"prefill": "req", "decode": "decode"}  # worker command -> work stream kind it scales on
WORKERS = tuple(KINDS)


def _manifests() -> list[dict]:
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    return [doc for doc in docs if doc]


MANIFESTS = _manifests()


def _of(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in MANIFESTS if doc["kind"] == kind}


def _config() -> dict[str, str]:
    return _of("ConfigMap")["grokstack-config"]["data"]


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict) -> dict:
    [container] = _pod(workload)["containers"]
    return container


def _role(workload: dict) -> str:
    command = _container(workload)["command"]
    assert command[0] == "grokstack"
    return command[1]


def _deployment(role: str) -> dict:
    [deployment] = [d for d in _of("Deployment").values() if _role(d) == role]
    return deployment


def _workloads() -> list[dict]:
    """Everything that runs pods: the Deployments and the provision Job."""
    return [*_of("Deployment").values(), *_of("Job").values()]


def _scaled_objects() -> list[tuple[dict, dict]]:
    deployments = _of("Deployment")
    return [(so, deployments.get(so["spec"]["scaleTargetRef"]["name"], {})) for so in _of("ScaledObject").values()]


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def _environment(container: dict) -> dict[str, str]:
    """The variables a container gets from the manifests (ConfigMaps of envFrom, then env); a value
    from a Secret or the downward API is '<from ...>'."""
    maps = _of("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else f"<from {next(iter(var['valueFrom']))}>"
    return env


def _port_number(container: dict, port: int | str) -> int:
    """The container port a probe or monitor names (by name or number), which it must declare."""
    declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in declared, f"{container['name']}: port {port!r} is not one of {sorted(declared)}"
        return declared[port]
    assert port in declared.values(), f"{container['name']}: port {port} is not declared"
    return port


def _mount_of(workload: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) that holds the file at `path` in the workload's container."""
    container = _container(workload)
    for mount in container.get("volumeMounts", []):
        if PurePosixPath(path).parent == PurePosixPath(mount["mountPath"]):
            [volume] = [v for v in _pod(workload)["volumes"] if v["name"] == mount["name"]]
            return mount, volume
    raise AssertionError(f"{workload['metadata']['name']}: nothing is mounted where {path} is")


def _file_of(volume: dict) -> list[str]:
    source = volume.get("secret") or volume.get("configMap") or {}
    return [item["path"] for item in source.get("items", [])]


# -- settings ----------------------------------------------------------------------------------


def test_every_grokstack_variable_the_manifests_set_is_a_setting():
    """ConfigMaps and every container's env: a misspelt variable would be ignored in silence."""
    known = set(ENV.values())
    for workload in _workloads():
        named = {var for var in _environment(_container(workload)) if var.startswith("GROKSTACK_")}
        assert named - known == set(), f"{workload['metadata']['name']}: not settings (see `grokstack settings`)"
    unknown = {var for var in _config() if var not in known}
    assert unknown == set(), f"not settings (see `grokstack settings`): {unknown}"


@pytest.mark.parametrize("name", sorted(d["metadata"]["name"] for d in _workloads()))
def test_every_pod_s_settings_validate(name):
    """A bad value (a port that is no number, an unknown log level) stops the process at start:
    load each pod's environment as the process would. Values from Secrets are stand-ins."""
    [workload] = [w for w in _workloads() if w["metadata"]["name"] == name]
    env = _environment(_container(workload))
    env.update({"NATS_URL": "tls://nats:4222", "REDIS_URL": "rediss://u:p@redis:6380/0"})
    env = {k: v for k, v in env.items() if not v.startswith("<from ")}
    try:
        from_env(env)
    except SettingsError as exc:
        pytest.fail(f"{name}: {exc}")


def test_no_service_link_variable_can_shadow_a_setting():
    """Kubernetes puts <SERVICE>_PORT=tcp://<ip>:<port> and the like into every pod of a namespace
    for each Service; the Service grokstack-edge makes GROKSTACK_EDGE_PORT, a setting (and not a
    number). Pods turn service links off, whatever ConfigMap sets the variable today."""
    injected = set()
    for service in _of("Service").values():
        base = service["metadata"]["name"].upper().replace("-", "_")
        injected |= {f"{base}_SERVICE_HOST", f"{base}_SERVICE_PORT", f"{base}_PORT"}
        for port in service["spec"]["ports"]:
            injected.add(f"{base}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
            tcp = f"{base}_PORT_{port['port']}_TCP"
            injected |= {tcp, f"{tcp}_PROTO", f"{tcp}_PORT", f"{tcp}_ADDR"}
    if injected & set(ENV.values()):
        for workload in _workloads():
            assert _pod(workload).get("enableServiceLinks") is False, workload["metadata"]["name"]


def test_every_pod_runs_a_grokstack_command():
    import argparse

    from services.cli import build_parser
    [commands] = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for workload in _workloads():
        assert _role(workload) in commands, f"{workload['metadata']['name']}: no command `grokstack {_role(workload)}`"


# -- KEDA ----------------------------------------------------------------------------------------


def test_every_scaled_object_targets_a_deployment_of_these_manifests():
    assert {so["metadata"]["name"] for so, _ in _scaled_objects()} == {"grokstack-prefill", "grokstack-decode"}
    for so, deployment in _scaled_objects():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert deployment, f"{so['metadata']['name']} scales {target}, not a Deployment of infra/k8s"
        assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"


def test_an_apply_does_not_resize_what_keda_scales():
    """`replicas` in a Deployment KEDA scales would set the pool back to it on every apply."""
    for so, deployment in _scaled_objects():
        assert "replicas" not in deployment["spec"], (
            f"{deployment['metadata']['name']} is scaled by KEDA ({so['metadata']['name']}): drop `replicas`")


def test_jetstream_triggers_read_the_streams_and_consumers_the_workers_create():
    """One trigger per priority consumer of the pool's stream, named as bus/subjects.py names
    them: renaming a consumer in the code without updating scaling.yaml fails here."""
    config = _config()
    subjects, region = Subjects(config["GROKSTACK_SUBJECT_PREFIX"]), config["GROKSTACK_REGION"]
    for so, deployment in _scaled_objects():
        kind = KINDS[_role(deployment)]
        read = {(t["metadata"]["stream"], t["metadata"]["consumer"])
                for t in so["spec"]["triggers"] if t["type"] == "nats-jetstream"}
        built = {(subjects.stream(kind, region), subjects.consumer(kind, region, p)) for p in PRIORITIES}  # type: ignore[arg-type]
        assert read == built, so["metadata"]["name"]


def test_trigger_metadata_is_strings_and_lag_thresholds_are_integers():
    """KEDA's CRD takes metadata as a map of strings, and the nats-jetstream scaler parses its
    thresholds as integers."""
    for so, _ in _scaled_objects():
        for trigger in so["spec"]["triggers"]:
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["name"]
            if trigger["type"] == "nats-jetstream":
                assert int(trigger["metadata"]["lagThreshold"]) > 0
                assert trigger["metadata"]["account"] and trigger["metadata"]["natsServerMonitoringEndpoint"]


def test_wait_triggers_query_the_gauge_the_edges_export_for_this_region():
    from edge import metrics
    config = _config()
    for so, _ in _scaled_objects():
        waits = [t for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
        priorities = {t["metadata"]["query"].split('priority="')[1].split('"')[0] for t in waits}
        assert priorities == {"interactive", "standard"}  # batch is meant to wait, not to buy GPUs
        for trigger in waits:
            query = trigger["metadata"]["query"]
            assert metrics.QUEUE_WAIT_ESTIMATE.describe()[0].name in query
            assert f'region="{config["GROKSTACK_REGION"]}"' in query
            # a wait is a property of the pool, not a per-replica quantity; KEDA rejects
            # `fallback` unless every trigger is AverageValue
            assert trigger["metricType"] == "Value" and "fallback" not in so["spec"]


def _exporters() -> dict[str, tuple[str, ...]]:
    """Metric name -> the labels it has, for the metrics the edges set (edge/metrics.py).
    Every process serves every package's registry, but only an edge sets these."""
    from edge import metrics
    return {collector.describe()[0].name: tuple(collector._labelnames)  # type: ignore[attr-defined]
            for collector in vars(metrics).values()
            if hasattr(collector, "_labelnames") and hasattr(collector, "describe")}


def test_the_pod_monitor_scrapes_the_series_the_wait_triggers_query():
    """The KEDA `prometheus` triggers read a Prometheus the Operator fills; a PodMonitor must
    select the pods that export the queried series, on a metrics port they declare, with the
    labels the query matches on."""
    config, exported = _config(), _exporters()
    monitors = list(_of("PodMonitor").values())
    assert monitors, "no PodMonitor: the Prometheus the wait triggers query has no grokstack series"
    edge = _deployment("edge")
    for so, _ in _scaled_objects():
        for trigger in (t for t in so["spec"]["triggers"] if t["type"] == "prometheus"):
            query = trigger["metadata"]["query"]
            [(name, matchers)] = re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", query)
            assert name in exported, f"{trigger['name']}: no edge exports {name}"
            assert set(re.findall(r"(\w+)\s*=", matchers)) <= set(exported[name]), trigger["name"]
            scraped = [m for m in monitors
                       if _selects(m["spec"]["selector"].get("matchLabels", {}),
                                   edge["spec"]["template"]["metadata"]["labels"])
                       and "namespaceSelector" not in m["spec"]]  # the pods' own namespace
            assert scraped, f"{trigger['name']}: no PodMonitor selects the edge pods exporting {name}"
            for monitor in scraped:
                for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                    port = _port_number(_container(edge), endpoint["port"])
                    assert port == int(config["GROKSTACK_METRICS_PORT"]), "scraped off the metrics port"
                paths = [e.get("path", "/metrics") for e in monitor["spec"]["podMetricsEndpoints"]]
                assert "/metrics" in paths and "/metrics/vllm" in paths, paths  # ours, and vLLM's own


def test_every_pool_is_scraped():
    monitors = list(_of("PodMonitor").values())
    for deployment in _of("Deployment").values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(_selects(m["spec"]["selector"].get("matchLabels", {}), labels) for m in monitors), \
            deployment["metadata"]["name"]


# -- draining ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", WORKERS)
def test_workers_get_longer_to_stop_than_they_take_to_drain(role):
    deployment = _deployment(role)
    grace = _pod(deployment)["terminationGracePeriodSeconds"]
    drain = max(Settings().worker.drain_timeout_s, float(_config().get(ENV["drain_timeout_s"], 0)))
    assert grace > drain
    # and the autoscaler removes at most one worker per grace period, so drains do not pile up
    [so] = [so for so, d in _scaled_objects() if d is deployment]
    policies = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"]
    assert all(p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= grace for p in policies)


@pytest.mark.parametrize("name", sorted(_of("Deployment")))
def test_a_disruption_budget_lets_a_drain_evict_one_pod_of_each_pool_at_a_time(name):
    deployment = _of("Deployment")[name]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budgets = [pdb for pdb in _of("PodDisruptionBudget").values()
               if _selects(pdb["spec"]["selector"].get("matchLabels", {}), labels)]
    assert len(budgets) == 1, f"{name}: {len(budgets)} PodDisruptionBudgets select its pods"
    [spec] = [b["spec"] for b in budgets]
    # one at a time, and never a budget that blocks a drain for good (minAvailable >= the pool)
    assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec, name
    assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", name


@pytest.mark.parametrize("name", sorted(_of("Deployment")))
def test_each_pool_spreads_over_nodes(name):
    """A node that fails or drains should take as few of a pool as the nodes allow (soft: a
    small cluster still schedules)."""
    deployment = _of("Deployment")[name]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spreads = [c for c in _pod(deployment).get("topologySpreadConstraints", [])
               if c["topologyKey"] == "kubernetes.io/hostname"
               and _selects(c["labelSelector"]["matchLabels"], labels)
               and c["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]]
    assert spreads, f"{name}: its pods are not spread over nodes"


# -- probes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_of("Deployment")))
def test_every_container_is_probed_on_a_port_it_declares(name):
    container = _container(_of("Deployment")[name])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{name}: no {probe}"
        _port_number(container, container[probe]["httpGet"]["port"])


def test_the_edge_is_probed_scraped_and_served_on_its_api_websocket_and_metrics_ports():
    """Alive = its event loop answers (probed on the API port, which that loop serves), not NATS:
    an outage must not restart every edge. Ready = connected to NATS, not "workers alive": with the
    workers down the edge stays in the Service and answers 503 with Retry-After itself."""
    edge = _deployment("edge")
    container, config = _container(edge), _config()
    api, ws, metrics = (int(config[v]) for v in ("GROKSTACK_API_PORT", "GROKSTACK_EDGE_PORT",
                                                 "GROKSTACK_METRICS_PORT"))
    assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {
        ("api", api), ("ws", ws), ("metrics", metrics)}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "api"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "api"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "api"}
    assert edge["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    service = _of("Service")["grokstack-edge"]
    assert service["spec"]["selector"] == edge["spec"]["selector"]["matchLabels"]
    # clients reach the API and the websocket; /metrics (request ids as exemplars) stays inside
    assert {p["port"] for p in service["spec"]["ports"]} == {api, ws}


@pytest.mark.parametrize("role", WORKERS)
def test_workers_are_probed_on_their_health_endpoints(role):
    """Startup and ready: the engine runs and the worker pulls work (/readyz); the startup probe
    keeps liveness off while the engine loads. Alive: the engine is alive and the event loop not
    stalled (/healthz), not NATS (an outage must not make every worker reload its model)."""
    container = _container(_deployment(role))
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    start = container["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300, "a GPU engine takes minutes to load"


@pytest.mark.parametrize("role", WORKERS)
def test_workers_run_the_gpu_profile_on_a_gpu_and_are_scraped_on_their_metrics_port(role):
    deployment = _deployment(role)
    container = _container(deployment)
    assert container["command"] == ["grokstack", role]
    assert {"name": "GROKSTACK_ENGINE_PROFILE", "value": "gpu"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == _config()["GROKSTACK_METRICS_PORT"]
    assert {"name": "metrics", "containerPort": int(_config()["GROKSTACK_METRICS_PORT"])} in container["ports"]


# -- locked down ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(w["metadata"]["name"] for w in _workloads()))
def test_every_pod_is_locked_down(name):
    [workload] = [w for w in _workloads() if w["metadata"]["name"] == name]
    pod = _pod(workload)
    assert pod.get("automountServiceAccountToken") is False, "the stack never calls the Kubernetes API"
    context = pod.get("securityContext", {})
    assert context.get("runAsNonRoot") is True
    assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0
    assert context.get("seccompProfile") == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    for container in [*pod["containers"], *pod.get("initContainers", [])]:
        own = container.get("securityContext", {})
        assert own.get("allowPrivilegeEscalation") is False, container["name"]
        assert own.get("readOnlyRootFilesystem") is True, container["name"]
        assert own.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        assert "add" not in own.get("capabilities", {}) and not own.get("privileged"), container["name"]
        assert own.get("runAsUser", context["runAsUser"]) > 0 and own.get("runAsNonRoot", True) is True


@pytest.mark.parametrize("name", sorted(w["metadata"]["name"] for w in _workloads()))
def test_where_the_processes_write_is_an_empty_dir(name):
    """The root filesystem is read-only: the data dir (vLLM's cache root is inside it), /tmp (and
    HOME, which points there: Triton's and Hugging Face's caches) are emptyDirs."""
    [workload] = [w for w in _workloads() if w["metadata"]["name"] == name]
    env = _environment(_container(workload))
    data_dir = env["GROKSTACK_DATA_DIR"]
    writable = [data_dir, "/tmp", env.get("HOME", "/tmp")]
    mounts = {m["mountPath"]: m for m in _container(workload)["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
    for path in writable:
        holder = max((p for p in mounts if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
        assert holder, f"{name}: {path} is on the read-only root filesystem"
        assert "emptyDir" in volumes[mounts[holder]["name"]] and not mounts[holder].get("readOnly"), path


# -- secrets and keys ------------------------------------------------------------------------------


def test_the_edges_run_with_api_keys_on():
    """GROKSTACK_API_KEYS_FILE set on the edge, the file mounted there, and a keys file the edge
    can load (edge/tenants.py): with no keys file, everyone would be tenant `public`."""
    from edge.tenants import KeysFile
    edge = _deployment("edge")
    path = _environment(_container(edge)).get("GROKSTACK_API_KEYS_FILE")
    assert path, "the edge has no GROKSTACK_API_KEYS_FILE: keys are off"
    mount, volume = _mount_of(edge, path)
    assert mount.get("readOnly") is True and PurePosixPath(path).name in _file_of(volume)
    [item] = [i for i in volume["configMap"]["items"] if i["path"] == PurePosixPath(path).name]
    keys = msgspec.json.decode(_of("ConfigMap")[volume["configMap"]["name"]]["data"][item["key"]], type=KeysFile)
    assert keys.tenants and all(tenant.keys for tenant in keys.tenants)


@pytest.mark.parametrize("role", ["edge", *WORKERS])
def test_the_signing_secret_is_one_secret_mounted_read_only(role):
    """Resume tokens (edges) and KV block tags (workers) must verify in every pod of every region:
    all of them read the same key of the same Secret, read-only (a missing file is not made)."""
    workload = _deployment(role)
    path = _environment(_container(workload))["GROKSTACK_SECRET_FILE"]
    mount, volume = _mount_of(workload, path)
    assert mount.get("readOnly") is True
    assert volume["secret"] == {"secretName": "grokstack-secret", "defaultMode": 0o440,
                                "items": [{"key": "secret", "path": PurePosixPath(path).name}]}


def test_each_pod_holds_only_its_own_role_s_nats_login():
    for workload in _workloads():
        role = _role(workload)
        path = _environment(_container(workload))["GROKSTACK_NATS_CREDENTIALS"]
        mount, volume = _mount_of(workload, path)
        assert mount.get("readOnly") is True
        expected = "ops" if role == "provision" else role
        assert volume["secret"]["items"] == [{"key": expected, "path": PurePosixPath(path).name}], role


def test_the_provision_job_runs_the_stack_s_image_and_config_as_ops():
    """Streams are provisioned once, before the runtime pools, by `grokstack provision` with the
    ops login; the runtime roles may not create or update streams. Like the edges it needs no engine,
    so it runs their image (tests/unit/test_images.py checks which images the pods run)."""
    [job] = _of("Job").values()
    container = _container(job)
    assert container["command"] == ["grokstack", "provision"]
    assert container["image"] == _container(_deployment("edge"))["image"]
    assert {"configMapRef": {"name": "grokstack-config"}} in container["envFrom"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"].get("ttlSecondsAfterFinished") is not None, "else a later apply never runs it again"


def test_every_secret_the_pods_use_is_created_in_the_readme():
    """The Secrets are not in these manifests (an apply would overwrite them with placeholders);
    infra/k8s/README.md creates each, with every key the pods read."""
    readme = (K8S / "README.md").read_text()
    wanted: dict[str, set[str]] = {}
    for workload in _workloads():
        for volume in _pod(workload).get("volumes", []):
            if "secret" in volume:
                wanted.setdefault(volume["secret"]["secretName"], set()).update(
                    i["key"] for i in volume["secret"].get("items", []))
        for container in _pod(workload)["containers"]:
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    wanted.setdefault(source["secretRef"]["name"], set())
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.setdefault(ref["name"], set()).add(ref["key"])
    assert set(wanted) >= {"grokstack-env", "grokstack-nats-logins", "grokstack-secret"}
    for secret, keys in wanted.items():
        assert f"create secret generic {secret}" in readme, f"README.md does not create {secret}"
        block = readme.split(f"create secret generic {secret}", 1)[1].split("\n\n", 1)[0]
        for key in keys:
            assert re.search(rf"--from-(file|literal)={re.escape(key)}=", block), f"{secret}: key {key}"
