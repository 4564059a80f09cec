"""The shipped deployments start the gateway with tokens and admit only labelled clients."""

from __future__ import annotations

import shlex

import pytest

from imgsearch.security import is_loopback
from tests.test_deploy import (
    DOCKERFILE,
    base_objects,
    dockerfile_env,
    final_stage,
    of_kind,
    selects,
    serve_config,
    tier_config,
    tier_deployments,
)

CLIENT_LABEL = {"imgsearch.io/client": "true"}


def test_the_kubernetes_base_starts_the_gateway_with_tokens_from_a_secret():
    from imgsearch.security import refuse_open_public_door

    objects = base_objects()
    gateway = tier_config(objects, "gateway")
    assert gateway.auth_tokens_file and not is_loopback(gateway.host)
    # The public door opens: tokens on, no --insecure-public needed.
    refuse_open_public_door(
        "gateway", gateway.host, gateway.auth_tokens_file, gateway.tls_client_ca, False
    )
    assert not gateway.insecure_public
    pod = tier_deployments(objects)["gateway"]["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert "imgsearch-auth-tokens" in secrets


def test_the_gateways_network_policy_admits_only_labelled_clients():
    objects = base_objects()
    labels = tier_deployments(objects)["gateway"]["spec"]["template"]["metadata"]["labels"]
    (policy,) = [
        p for p in of_kind(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)
    ]
    stranger = {"app": "anything"}
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from", [])
        assert peers, f"a rule open to every source: {rule}"
        for peer in peers:
            assert "ipBlock" not in peer
            assert not selects(peer["podSelector"], stranger), peer
    grpc_peers = [
        peer
        for rule in policy["spec"]["ingress"]
        if "grpc" in {port["port"] for port in rule["ports"]}
        for peer in rule["from"]
    ]
    labelled = {**stranger, **CLIENT_LABEL}
    assert any(
        selects(peer["podSelector"], labelled) and "namespaceSelector" in peer
        for peer in grpc_peers
    )


def test_the_image_and_its_documented_docker_run_start_with_tokens():
    env = dockerfile_env()
    assert env["IMGSEARCH_AUTH_TOKENS_FILE"].startswith("/var/lib/imgsearch/")
    (entrypoint,) = [rest for keyword, rest in final_stage() if keyword == "ENTRYPOINT"]
    (command,) = [rest for keyword, rest in final_stage() if keyword == "CMD"]
    argv = ["imgsearch", *eval(command)]  # JSON-form CMD: a list of strings
    assert eval(entrypoint) == ["imgsearch"] and argv[1:] == ["serve", "all"]
    header = [line[1:].strip() for line in DOCKERFILE.read_text().splitlines() if line[:1] == "#"]
    run = " ".join(header).split("docker run", 1)[1].split(" REGISTRY/")[0].replace("\\", " ")
    documented = dict(
        pair.split("=", 1)
        for flag, pair in zip(shlex.split(run), shlex.split(run)[1:])
        if flag == "-e"
    )
    assert documented["IMGSEARCH_HOST"] == "0.0.0.0"
    assert documented["IMGSEARCH_AUTH_TOKENS_FILE"].startswith("/var/lib/imgsearch/")
    # What that container's gateway runs with: tokens on a public address, so it starts.
    from imgsearch.security import refuse_open_public_door

    _, gateway = serve_config(["imgsearch", "serve", "gateway"], {**env, **documented})
    assert gateway.auth_tokens_file == documented["IMGSEARCH_AUTH_TOKENS_FILE"]
    refuse_open_public_door("gateway", gateway.host, gateway.auth_tokens_file, "", False)
    # Without the tokens file setting it would refuse, naming the way out.
    with pytest.raises(ValueError, match="--insecure-public"):
        refuse_open_public_door("gateway", gateway.host, "", "", False)
