"""infra/k8s agrees with the code: the KEDA triggers read the consumers bus/subjects.py builds,
scale Deployments that exist, and workers get longer to stop than they take to drain."""

from pathlib import Path

import pytest
import yaml

from bus.priorities import PRIORITIES
from bus.subjects import Subjects
from services.settings import ENV, Settings

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
KINDS = {"prefill": "req", "decode": "decode"}  # worker command -> work stream kind it scales on


def _manifests() -> list[dict]:
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    return [doc for doc in docs if doc]


MANIFESTS = _manifests()


def _of(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in MANIFESTS if doc["kind"] == kind}


def _config() -> dict[str, str]:
    return _of("ConfigMap")["grokstack-config"]["data"]


def _container(deployment: dict) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _role(deployment: dict) -> str:
    command = _container(deployment)["command"]
    assert command[0] == "grokstack"
    return command[1]


def _scaled_objects() -> list[tuple[dict, dict]]:
    deployments = _of("Deployment")
    return [(so, deployments.get(so["spec"]["scaleTargetRef"]["name"], {})) for so in _of("ScaledObject").values()]


def test_the_config_names_only_real_settings():
    unknown = set(_config()) - set(ENV.values())
    assert unknown == set(), f"not settings (see `grokstack settings`): {unknown}"


def test_every_scaled_object_targets_a_deployment_of_these_manifests():
    assert {so["metadata"]["name"] for so, _ in _scaled_objects()} == {"grokstack-prefill", "grokstack-decode"}
    for so, deployment in _scaled_objects():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert deployment, f"{so['metadata']['name']} scales {target}, not a Deployment of infra/k8s"
        assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"


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


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_workers_get_longer_to_stop_than_they_take_to_drain(role):
    deployment = _of("Deployment")[f"grokstack-{role}"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = max(Settings().worker.drain_timeout_s, float(_config().get(ENV["drain_timeout_s"], 0)))
    assert grace > drain
    # and the autoscaler removes at most one worker per grace period, so drains do not pile up
    [so] = [so for so, d in _scaled_objects() if d is deployment]
    policies = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"]
    assert all(p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= grace for p in policies)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_workers_run_the_gpu_profile_on_a_gpu_and_are_scraped_on_their_metrics_port(role):
    deployment = _of("Deployment")[f"grokstack-{role}"]
    container = _container(deployment)
    assert container["command"] == ["grokstack", role]
    assert {"name": "GROKSTACK_ENGINE_PROFILE", "value": "gpu"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == _config()["GROKSTACK_METRICS_PORT"]
    assert {"name": "metrics", "containerPort": int(_config()["GROKSTACK_METRICS_PORT"])} in container["ports"]


def test_the_edge_is_probed_scraped_and_served_on_its_api_and_websocket_ports():
    edge = _of("Deployment")["grokstack-edge"]
    container, config = _container(edge), _config()
    api, ws = int(config["GROKSTACK_API_PORT"]), int(config["GROKSTACK_EDGE_PORT"])
    assert {p["containerPort"] for p in container["ports"]} == {api, ws}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert edge["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(api)
    service = _of("Service")["grokstack-edge"]
    assert service["spec"]["selector"] == edge["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in service["spec"]["ports"]} == {api, ws}


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_workers_are_probed_on_their_health_endpoints(role):
    """Ready once the engine runs and it pulls work (/readyz, which each worker serves beside /metrics:
    tests/pipeline/test_health.py); alive while the process answers at all (a NATS outage must not
    restart every worker and make it reload its model)."""
    container = _container(_of("Deployment")[f"grokstack-{role}"])
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/metrics")):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
