"""The variants of a tier's server that :mod:`imgsearch_tools.bench.tier_cost` measures.

Each variant is the shipped server with this process's code patched before it starts:
``shipped`` as is; ``cached``, the method answering the bare tier's canned response (the
gateway's first makes the bare gateway's two downstream calls); ``no-PIECE``, one piece of
the method's work replaced by its precomputed result (:data:`PIECES`); ``no-interceptor``,
the port without the serving runtime's interceptor; or several joined by ``+``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imgsearch_tools.bench.bare_chain import PAYLOAD_FILES

METHODS = {
    "retrieval": "/imgsearch.retrieval.v1.RetrievalService/Retrieve",
    "ranking": "/imgsearch.ranking.v1.RankingService/Rank",
    "gateway": "/imgsearch.search.v1.SearchService/Search",
}
# The pieces of each tier's method that a variant replaces by their precomputed result:
# (module, attribute path) of the callable, patched in the server process before it starts,
# and the key of the calls that share one result (what the result's shape depends on).
PIECES = {
    "ranking": {
        "lookup": ("imgsearch.catalogue", "Catalogue.photo_idx_list", lambda a: len(a[1])),
        "score": ("ranking_service.rankers.als", "ALSRanker.score", lambda a: len(a[1].candidates)),
        "topk": ("ranking_service.server", "top_k", lambda a: (len(a[0]), a[1])),
    },
    "retrieval": {
        "lookup": ("retrieval_service.keyword_index", "KeywordIndex.retrieve", lambda a: a[2]),
        "response": ("retrieval_service.server", "to_response", lambda a: None),
    },
    # The gateway's downstreams are the bare tiers: every search gets the same candidates.
    "gateway": {
        "validate": ("gateway.server", "validate", lambda a: None),
        "candidates": ("gateway.server", "Candidates", lambda a: None),
    },
}


# ------------------------------------------------------------------- the variants' servers
def _resolve(module: str, path: str):
    import importlib

    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def install_variant(tier: str, variant: str, payloads: Path) -> None:
    """Patch this process's code into ``variant`` of ``tier`` before its server starts:
    ``shipped``, ``cached``, ``no-PIECE``, ``no-interceptor`` (the port without the serving
    runtime's interceptor: no request id, readiness, admission, error mapping or metrics), or
    several joined by ``+``."""
    for part in variant.split("+"):
        if part == "cached":
            _answer_canned(tier, (payloads / PAYLOAD_FILES[tier]).read_bytes())
        elif part == "no-interceptor":
            from imgsearch.serving import runtime

            new_server = runtime.new_server
            runtime.new_server = lambda name, host, port, interceptors, *rest, **options: (
                new_server(name, host, port, None, *rest, **options)
            )
        elif part != "shipped":
            _replay(*PIECES[tier][part.removeprefix("no-")])


def _answer_canned(tier: str, canned: bytes) -> None:
    """The tier's method answers ``canned`` (the bare tier's response) to every call; the
    gateway's first makes the bare gateway's two downstream calls."""
    if tier == "gateway":
        _forward_canned(canned)
        return
    if tier == "ranking":
        from imgsearch.ranking.v1 import ranking_service_pb2 as pb
        from ranking_service.server import RankingServicer as servicer
    else:
        from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb
        from retrieval_service.server import RetrievalServicer as servicer
    method = METHODS[tier].rsplit("/", 1)[1]
    response = getattr(pb, method + "Response").FromString(canned)

    async def answer(self, request, context):
        return response

    setattr(servicer, method, answer)


def _forward_canned(canned: bytes) -> None:
    """The gateway's ``Search`` does what the bare gateway does: retrieve, rank the
    candidates, answer the canned response (through the gateway's own channels)."""
    from gateway.server import SearchServicer
    from imgsearch.search.v1 import search_service_pb2 as pb
    from imgsearch_tools.bench.bare_chain import forwarded_rank, forwarded_retrieve

    response = pb.SearchResponse.FromString(canned)

    async def forward(self, request, context):
        retrieve = self.retrieval.retrieve(forwarded_retrieve(request), timeout=2.0, metadata=None)
        retrieved, _ = await retrieve
        await self.ranking.Rank(forwarded_rank(request, retrieved), timeout=2.0)
        return response

    SearchServicer.Search = forward


def _replay(module: str, path: str, key_of) -> None:
    """The callable at ``module``.``path`` computes one result per ``key_of(args)`` (the
    first call's with that key) and answers it to every later call with that key."""
    owner, name = _resolve(module, path)
    original = getattr(owner, name)
    remembered = {}

    def replayed(*args, **kwargs):
        key = key_of(args)
        if key not in remembered:
            remembered[key] = original(*args, **kwargs)
        return remembered[key]

    if isinstance(owner, type):
        setattr(owner, name, lambda *args, **kwargs: replayed(*args, **kwargs))
        return
    setattr(owner, name, replayed)
    # Callers that imported the name hold their own reference: patch theirs too.
    for module_object in list(sys.modules.values()):
        if getattr(module_object, name, None) is original:
            setattr(module_object, name, replayed)
