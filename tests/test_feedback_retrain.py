"""The offline side of the loop: export the logged conversions, retrain on them, reload."""

from __future__ import annotations

import shutil

import grpc
import pandas as pd

from imgsearch import artifacts
from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
from imgsearch.catalogue import Catalogue
from imgsearch.conversion_store import default_db_path, open_store
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
from imgsearch_tools.cli import main
from tests.test_feedback_loop import UNSEEN, log, taste_of_the_most_active_user


def catalogue_of(root, folder: str = artifacts.CATALOGUE_DIR) -> Catalogue:
    return Catalogue.load(artifacts.resolve(root).file(folder))


def rank_notes(target: str, user_id: str, photo_ids: list[str]) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        response = rank_grpc.RankingServiceStub(channel).Rank(
            rank_pb.RankRequest(
                user_id=user_id,
                query="blue",
                candidate_photo_ids=photo_ids,
                k=5,
                ranker=rank_pb.RANKER_ALS,
            ),
            timeout=10,
        )
    return [response.fallback_reason]


def test_export_then_retrain_with_logged_events_then_reload(
    loop_thread, artifact_root, catalogue, tmp_path, capsys
):
    from gateway.server import create_gateway_server
    from imgsearch.config import GatewayConfig, RankingConfig
    from ranking_service.server import create_ranking_server

    root = tmp_path / "artifacts"
    shutil.copytree(artifact_root, root, symlinks=True)
    base_conversions = len(catalogue.conversions)
    taste = taste_of_the_most_active_user(catalogue)
    candidates = catalogue.photos["photo_id"].tolist()[:50]

    # Both servers find the store as they would with no settings: beside the artifact root.
    gateway = loop_thread.run(
        create_gateway_server(
            GatewayConfig(artifacts=str(root), port=0, admin_port=0, ranking_addr="x:1")
        )
    )
    ranking = loop_thread.run(
        create_ranking_server(
            RankingConfig(artifacts=str(root), port=0, admin_port=0, foldin_conversions=0)
        )
    )
    ranking_target = f"127.0.0.1:{ranking.port}"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            assert log(channel, UNSEEN, taste).stored_count == len(taste)
        assert default_db_path(root).exists()

        out = tmp_path / "logged.tsv"
        assert main(["export-conversions", "--artifacts", str(root), "--quiet", str(out)]) == 0
        exported = pd.read_csv(out, sep="\t")
        assert list(exported.columns) == [
            "converted_at",
            "conversion_type",
            "keyword",
            "photo_id",
            "anonymous_user_id",
            "conversion_country",
            "event_id",
        ]
        assert sorted(exported["event_id"]) == sorted(f"{UNSEEN}-{i}" for i in range(len(taste)))
        assert set(exported["anonymous_user_id"]) == {UNSEEN}

        # Ranking does not know the user yet (fold-in is off here): the model must learn it.
        assert "unknown user" in rank_notes(ranking_target, UNSEEN, candidates)[0]
        before = artifacts.resolve(root).version
        train = ["train", "--artifacts", str(root), "--rankers", "als", "--with-logged-events"]
        assert main([*train, "--quiet"]) == 0
        retrained = artifacts.resolve(root)
        assert retrained.version != before
        assert retrained.manifest["logged_conversions"] == {
            "events": len(taste),
            "merged": len(taste),
            "unknown_photo": 0,
            "users": 1,
            "new_users": 1,
        }
        merged = catalogue_of(root)
        assert len(merged.conversions) == base_conversions + len(taste)
        assert merged.user_idx(UNSEEN) is not None
        assert len(catalogue_of(root, artifacts.BASE_CATALOGUE_DIR).conversions) == (
            base_conversions
        )
        # Every ranker was retrained on the renumbered users, not only the one asked for.
        assert set(retrained.rankers) == {"none", "popularity", "als"}

        with grpc.insecure_channel(f"127.0.0.1:{ranking.admin_port}") as channel:
            reloaded = admin_grpc.AdminServiceStub(channel).Reload(
                admin_pb.ReloadRequest(), timeout=60
            )
        assert reloaded.version == retrained.version
        assert "unknown user" not in rank_notes(ranking_target, UNSEEN, candidates)[0]

        # Retraining again merges the store's events into the catalogue as built: not twice.
        assert main([*train, "--quiet"]) == 0
        assert len(catalogue_of(root).conversions) == base_conversions + len(taste)

        # A privacy deletion is honoured by the next retraining.
        with open_store(db=default_db_path(root)) as store:
            assert store.delete_user(UNSEEN) == len(taste)
        assert main([*train, "--quiet"]) == 0
        assert catalogue_of(root).user_idx(UNSEEN) is None
        assert len(catalogue_of(root).conversions) == base_conversions
    finally:
        loop_thread.run(gateway.stop(0))
        loop_thread.run(ranking.stop(0))


def test_export_refuses_a_store_that_does_not_exist(tmp_path, capsys):
    assert main(["export-conversions", "--artifacts", str(tmp_path / "none"), "x.tsv"]) == 1
    assert "no conversion store" in capsys.readouterr().err
    assert not (tmp_path / "none-conversions.sqlite3").exists()
