"""Two-step ranking's merge: ranked voting (Borda count) over two lists of photo ids."""

from __future__ import annotations


def borda_merge(first: list[str], second: list[str]) -> list[tuple[str, float]]:
    """Ranked voting over two lists: each list gives n - rank points; only shared items count.

    The seed study's two-step ranking intersects ALS recommendations with CLIP results and
    merges the two orders by ranked voting.
    """
    points: dict[str, float] = {}
    n1, n2 = len(first), len(second)
    pos2 = {pid: i for i, pid in enumerate(second)}
    for i, pid in enumerate(first):
        j = pos2.get(pid)
        if j is not None:
            points[pid] = (n1 - i) / n1 + (n2 - j) / n2
    return sorted(points.items(), key=lambda item: -item[1])
