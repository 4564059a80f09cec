"""What serving retrieves, asked offline: the default retriever of a set and its candidates.

Ranker training (``imgsearch build``, ``imgsearch train``, ``imgsearch eval``) validates on
the candidates the retriever served by default returns and draws hard negatives from them, so
it asks that retriever, loaded as the retrieval service loads it.
"""

from __future__ import annotations

from pathlib import Path

# Candidates asked of the retriever per conversion keyword for ranker training: validation
# ranks the first 100, BPR draws hard negatives from all of them (FM's ``negative_pool``).
CANDIDATE_DEPTH = 2000

__all__ = ["CANDIDATE_DEPTH", "candidates_summary", "served_candidates", "served_retrievers"]


def served_retrievers(set_dir: Path, keyword_index) -> dict:
    """The CLIP and hybrid retrievers of a set as the retrieval service loads them ({} if none).

    Torch's thread setting is left as it is: the build trains rankers next.
    """
    from imgsearch import artifacts

    if not (Path(set_dir) / artifacts.VECTOR_INDEX).exists():
        return {}
    from retrieval_service.semantic import load_clip_retrievers

    return load_clip_retrievers(set_dir, keyword_index, threads=None)


def served_candidates(catalogue, retriever, show_progress: bool = False):
    """The retriever's candidates for every keyword of the catalogue's conversions.

    Ranker training validates on them and draws hard negatives from them, so it sees what
    serving retrieves (:class:`~imgsearch.candidates.CandidateLists`).

    Parameters
    ----------
    catalogue:
        The catalogue whose conversions the rankers train on.
    retriever:
        The retriever served by default (``retrieve(query, k)``): hybrid when the set has CLIP,
        else the keyword index (see :func:`served_retrievers`).
    show_progress:
        A progress bar.
    """
    from imgsearch.candidates import CandidateLists

    return CandidateLists.collect(
        catalogue.conversions["keyword"].unique(),
        retriever.retrieve,
        CANDIDATE_DEPTH,
        retriever=retriever.name,
        show_progress=show_progress,
    )


def candidates_summary(candidates) -> dict:
    """What the manifest records of the candidate lists rankers trained with."""
    lengths = [len(candidates.top(k)[0]) for k in candidates.keywords]
    return {
        "retriever": candidates.retriever,
        "depth": candidates.depth,
        "keywords": len(candidates),
        "empty_keywords": int(sum(n == 0 for n in lengths)),
    }
