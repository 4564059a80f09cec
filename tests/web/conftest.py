"""A small demo catalogue with images, its served stack, and `imgsearch web` in front of it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import Stack

SIZES = {"n_photos": 300, "n_users": 60, "n_conversions": 4000, "seed": 11}
# Catalogue text a page must show as text, never run: it lands in one photo's description.
HOSTILE = "<img src=x onerror=document.title='owned'><b>bold</b> & <i>more</i>"


@pytest.fixture(scope="session")
def web_data(tmp_path_factory) -> Path:
    """A demo catalogue with images, one photo described with HTML markup."""
    from imgsearch_tools.demo_data import generate

    out = tmp_path_factory.mktemp("web-data")
    generate(out, image_size=32, show_progress=False, **SIZES)
    photos = sorted(out.glob("photos.tsv*"))[0]
    with photos.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rows[0]["photo_description"] = HOSTILE
    (out / "hostile-photo").write_text(rows[0]["photo_id"])
    with photos.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE)
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="session")
def hostile_query(web_data) -> str:
    """A query that finds the photo with the hostile description: its three surest keywords."""
    photo_id = (web_data / "hostile-photo").read_text()
    own = []
    for keywords in sorted(web_data.glob("keywords.tsv*")):
        with keywords.open(newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row["photo_id"] == photo_id:
                    own.append((-float(row["ai_service_1_confidence"] or 0), row["keyword"]))
    return " ".join(keyword for _, keyword in sorted(own)[:3])


@pytest.fixture(scope="session")
def web_artifacts(web_data, tmp_path_factory) -> Path:
    """Its artifact set: keyword index and none/popularity/ALS (no CLIP: fast)."""
    from imgsearch_tools.build import build_artifacts

    root = tmp_path_factory.mktemp("web-artifacts")
    build_artifacts(
        str(web_data), str(root), ["none", "popularity", "als"], clip=False, show_progress=False
    )
    return root


@pytest.fixture(scope="module")
def web_stack(loop_thread, web_artifacts, tmp_path_factory):
    """Retrieval, ranking and the gateway, logging conversions into a fresh SQLite file."""
    db = tmp_path_factory.mktemp("web-store") / "conversions.sqlite3"
    stack = Stack(loop_thread, web_artifacts, store={"conversions_db": str(db)})
    yield stack
    stack.stop()


class RunningDoor:
    """The door on an ephemeral port of 127.0.0.1, in the stack's event loop: `imgsearch web`
    over gRPC, or with ``gateway`` (a :class:`GatewayInProcess`) inside the gateway."""

    def __init__(self, loop_thread, config, security=None, gateway=None):
        from imgsearch_tools.web.commands import page_url, start

        self.lt = loop_thread
        self.runner, self.port = loop_thread.run(start(config, security, gateway=gateway))
        self.url = page_url(config, self.port)

    def stop(self) -> None:
        self.lt.run(self.runner.cleanup())


# The two deployments every test of the `door` fixture runs against.
DEPLOYMENTS = ("standalone", "in-gateway")


def in_gateway(stack):
    """The stack's gateway, called in its own process (the door of `serve gateway --web-port`)."""
    from imgsearch_tools.web.gateways import GatewayInProcess

    return GatewayInProcess(stack.gateway)


def door_config(stack, web_artifacts, web_data, **overrides):
    from imgsearch.config import WebConfig

    return WebConfig(
        **{
            "host": "127.0.0.1",
            "port": 0,
            "gateway_addr": stack.target,
            "artifacts": str(web_artifacts),
            "images": str(web_data / "images"),
            "tls_cert": "",
            "tls_key": "",
            "tls_client_ca": "",
            "auth_tokens_file": "",
            **overrides,
        }
    )


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def door(request, loop_thread, web_stack, web_artifacts, web_data):
    gateway = in_gateway(web_stack) if request.param == "in-gateway" else None
    config = door_config(web_stack, web_artifacts, web_data)
    running = RunningDoor(loop_thread, config, gateway=gateway)
    yield running
    running.stop()
