"""bench-scale's report: a table per figure and size, a plot, and the stated extrapolation.

The extrapolation to 10,000,000 photos on 4 shards is arithmetic, not a measurement: each figure
grows from the largest measured size with the exponent it showed between the two largest sizes
(``y ∝ photos^b``, ``b = log(y2/y1) / log(x2/x1)``). Retrieval is sharded by photo, so each of
the 4 retrieval servers holds 2,500,000 photos; the build, the ranking server and the gateway
see the whole catalogue.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TARGET_PHOTOS = 10_000_000
TARGET_SHARDS = 4
LOAD_GENERATORS = {"go": "compiled (grpc-go)", "python": "Python (grpc.aio)"}


def growth(sizes: list[int], values: list[float | None], at: int) -> tuple[float, float] | None:
    """(exponent, value at ``at``) from the two largest sizes with a positive value."""
    points = [(s, v) for s, v in zip(sizes, values) if v is not None and v > 0]
    if len(points) < 2:
        return None
    (x1, y1), (x2, y2) = points[-2], points[-1]
    exponent = math.log(y2 / y1) / math.log(x2 / x1)
    return exponent, y2 * (at / x2) ** exponent


def rows(report: dict) -> dict[str, list]:
    """Figure name -> its value per size (None where not measured)."""
    table: dict[str, list] = {}

    def put(name: str, index: int, value) -> None:
        table.setdefault(name, [None] * len(report["sizes"]))[index] = value

    for i, size in enumerate(report["sizes"]):
        made = size["demo_data"]
        if not made.get("kept"):
            put("demo-data s", i, made["seconds"])
            put("demo-data CPU s", i, made.get("cpu_seconds"))
            put("demo-data peak MiB", i, made["peak_rss_mib"])
        build = size["build"]
        if not build.get("kept"):
            put("build s (whole command)", i, build["seconds"])
            put("build CPU s (whole command)", i, build.get("cpu_seconds"))
            put("build peak MiB (whole command)", i, build["peak_rss_mib"])
        for step in build["steps"]:
            put(f"build step {step['step']} s", i, step["seconds"])
            put(f"build step {step['step']} CPU s", i, step.get("cpu_seconds"))
            put(f"build step {step['step']} peak MiB", i, step["peak_rss_mib"])
        for name, entry in build["rankers"].items():
            put(f"ranker {name} s", i, entry.get("seconds"))
        index = build.get("vector_index") or {}
        calibration = index.get("calibration") or {}
        if calibration.get("parameter"):
            put(f"vector index {calibration['parameter']} (calibrated)", i, calibration["value"])
            for name, chosen in (calibration.get("by_query") or {}).items():
                label = f"vector index {calibration['parameter']}, {name} queries (calibrated)"
                put(label, i, chosen["value"])
        if index.get("recall@10_vs_exact") is not None:
            put("vector index recall@10 vs exact", i, index["recall@10_vs_exact"])
        for name, n_bytes in build["bytes"].items():
            if n_bytes:
                put(f"{name} MiB", i, round(n_bytes / 2**20, 1))
        served = size["serving"]
        for name, seconds in served.get("load_seconds", {}).items():
            put(f"{name} load s", i, seconds)
        for name, mib in served.get("resident_mib", {}).items():
            put(f"{name} resident MiB", i, mib)
        for name, result in served.get("scenarios", {}).items():
            put(f"{name} p50 ms", i, result["p50_ms"])
            put(f"{name} p99 ms", i, result["p99_ms"])
            put(f"{name} errors", i, result["errors"])
    return table


def extrapolated(name: str, sizes: list[int], values: list) -> tuple[str, str]:
    """(growth per 10× photos, value at 10M on 4 shards) of one figure, as text."""
    if name.endswith("errors") or name.startswith("vector index recall") or "calibrated" in name:
        return "", ""  # counts and settings, not costs that grow with the photos
    retrieval_side = name.startswith(("retrieval ", "keyword index", "vector index", "embed"))
    at = TARGET_PHOTOS // TARGET_SHARDS if retrieval_side else TARGET_PHOTOS
    fit = growth(sizes, values, at)
    if fit is None:
        return "", ""
    exponent, value = fit
    where = " per shard" if retrieval_side else ""
    return f"{10**exponent:.1f}×", f"{value:,.1f}{where}"


def markdown(report: dict) -> str:
    """The report as Markdown: settings, one row per figure, the extrapolation's method."""
    sizes = [s["photos"] for s in report["sizes"]]
    head = "| figure | " + " | ".join(f"{s:,} photos" for s in sizes)
    head += " | growth per 10× | 10M on 4 shards (extrapolated) |\n"
    head += "|---" * (len(sizes) + 3) + "|\n"
    body = ""
    for name, values in rows(report).items():
        cells = ["" if v is None else f"{v:,}" for v in values]
        body += f"| {name} | " + " | ".join(cells)
        body += " | " + " | ".join(extrapolated(name, sizes, values)) + " |\n"
    skipped = {
        f"{s['photos']:,}": s["build"]["rankers_skipped"]
        for s in report["sizes"]
        if s["build"]["rankers_skipped"]
    }
    settings = report["settings"]
    text = (
        f"Catalogues: `demo-data` seed {settings['seed']}, {settings['users_per_photo']:g} "
        f"user(s) and {settings['conversions_per_photo']:g} conversions per photo, "
        f"{'with images (tiny CLIP)' if settings['images'] else 'tables only (no CLIP)'}; "
        f"rankers {settings['rankers']}; offered load {settings['qps']:g} searches/s for "
        f"{settings['duration']:g} s per scenario, sent by the "
        f"{LOAD_GENERATORS.get(settings.get('load_generator'), 'Python')} load generator. "
        "Load average (1 min) at the start: "
        f"{report['loadavg_1m_at_start']}.\n\n" + head + body
    )
    if skipped:
        text += f"\nRankers skipped: {json.dumps(skipped)}\n"
    text += (
        "\nGeneration and builds run at the lowest CPU and disk priority (nice 19, ionice idle): "
        "on a shared machine their wall seconds say how long they waited, their CPU seconds "
        "(user + system) how much work they were; only the serving figures are taken under "
        "the CPU lock.\n"
    )
    text += (
        "\nGrowth per 10× is the ratio the figure showed between the two largest sizes, "
        "scaled to a tenfold step; the last column carries it on to 10,000,000 photos "
        "(2,500,000 per retrieval shard). It is arithmetic, not a measurement.\n"
    )
    return text


def plot(report: dict, path: Path) -> None:
    """Build seconds and peak memory per step, and serving p99, against photos (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["photos"] for s in report["sizes"]]
    table = rows(report)
    panels = (
        ("build CPU seconds per step", lambda n: n.startswith("build step") and "CPU" in n),
        ("peak memory per step (MiB)", lambda n: n.startswith("build step") and "MiB" in n),
        ("serving p99 (ms)", lambda n: n.endswith("p99 ms")),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for axis, (title, wanted) in zip(axes, panels):
        for name, values in table.items():
            points = [(s, v) for s, v in zip(sizes, values) if v]
            if wanted(name) and points:
                axis.plot(*zip(*points), marker="o", label=name)
        axis.set(xscale="log", yscale="log", title=title, xlabel="photos")
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, results_page: str | None = None) -> None:
    """scale.json, scale.md, scale.png in ``out``; the results page when asked."""
    from imgsearch_tools.results_page import write_results_page

    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "scale.md").write_text("# Scale\n\n" + text)
    plot(report, out / "scale.png")
    if results_page:
        page = Path(results_page)
        image = page.with_suffix(".png")
        page.parent.mkdir(parents=True, exist_ok=True)
        body = text + f"\n![build and serving figures against photos]({image.name})\n"
        # The page first: its header reads the commit, and the plot beside it is a tracked
        # file too, which would make the tree count as changed.
        write_results_page(
            page, "Scale: a catalogue from 10,000 photos up", report["command"], body
        )
        image.write_bytes((out / "scale.png").read_bytes())
