"""Held-out tag precision of a CLIP's text-to-image retrieval, per query family."""

from __future__ import annotations

from typing import Any

import numpy as np


def heldout_figures(
    bundle: Any,
    image_emb: np.ndarray,
    photo_keywords: list[set[str]],
    families: dict[str, list[str]],
    pair_of: tuple[str, str] | None,
    k: int = 10,
) -> dict:
    """Tag precision@k of text-to-image retrieval among held-out photos, per query family.

    A retrieved photo counts when it is tagged with every keyword of the query (its labels when
    the catalogue has them, else its keywords at any confidence, as ``imgsearch eval``'s
    ``tag_p@10``). ``ceiling`` is the best reachable figure: a query
    with fewer than ``k`` relevant held-out photos cannot reach 1.

    Returns
    -------
    dict
        Per family: ``{"p@10", "ceiling", "queries"}``; pairs under ``"<a>+<b>"``.
    """
    queries: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    if families:
        for family, words in families.items():
            queries[family] = [(w, (w,)) for w in words]
        if pair_of:
            first, second = pair_of
            queries[f"{first}+{second}"] = [
                (f"{a} {b}", (a, b)) for a in families[first] for b in families[second]
            ]
    else:
        counts: dict[str, int] = {}
        pair_counts: dict[tuple[str, str], int] = {}
        for tags in photo_keywords:
            ordered = sorted(tags)
            for a in ordered:
                counts[a] = counts.get(a, 0) + 1
            for x in range(len(ordered)):
                for y in range(x + 1, len(ordered)):
                    key = (ordered[x], ordered[y])
                    pair_counts[key] = pair_counts.get(key, 0) + 1
        top = sorted(counts, key=lambda w: (-counts[w], w))[:50]
        top_pairs = sorted(pair_counts, key=lambda p: (-pair_counts[p], p))[:50]
        queries["keyword"] = [(w, (w,)) for w in top]
        queries["pair"] = [(f"{a} {b}", (a, b)) for a, b in top_pairs]
    figures = {}
    k = min(k, len(image_emb))
    for family, items in queries.items():
        relevant_counts = [
            sum(all(w in t for w in need) for t in photo_keywords) for _, need in items
        ]
        items = [item for item, n in zip(items, relevant_counts) if n > 0]
        relevant_counts = [n for n in relevant_counts if n > 0]
        if not items or k == 0:
            continue
        text_emb = bundle.encode_text([text for text, _ in items])
        top = np.argsort(-(text_emb @ image_emb.T), axis=1, kind="stable")[:, :k]
        precision = [
            np.mean([all(w in photo_keywords[r] for w in need) for r in rows])
            for (_, need), rows in zip(items, top)
        ]
        figures[family] = {
            f"p@{k}": round(float(np.mean(precision)), 4),
            "ceiling": round(float(np.mean([min(1.0, n / k) for n in relevant_counts])), 4),
            "queries": len(items),
        }
    return figures


def format_figures(figures: dict) -> str:
    """The held-out figures as a small table."""
    lines = [f"{'held-out queries':<18} {'tag P@10':>9} {'ceiling':>8} {'queries':>8}"]
    for family, row in figures.items():
        p_key = next(key for key in row if key.startswith("p@"))
        lines.append(f"{family:<18} {row[p_key]:>9.3f} {row['ceiling']:>8.3f} {row['queries']:>8}")
    return "\n".join(lines)
