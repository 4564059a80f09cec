"""bench.md: the suite's figures as tables a reader can check."""

from __future__ import annotations

from imgsearch_tools.bench.bare_chain import floor_lines
from imgsearch_tools.bench.json_door import render_json_door
from imgsearch_tools.bench.processes import LOADGEN

TABLE_HEADER = [
    "| scenario | achieved QPS | p50 ms | p90 ms | p99 ms | max ms | errors | degraded "
    "| in-process p50 ms | e2e / in-process p50 | CPU ms per search: gateway · retrieval · "
    "ranking · load gen = total | CPU-bound ceiling QPS | CPU used (cores) "
    "| other processes (cores) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
]


# The results page's title when bench-suite runs one section alone (--only NAME).
SECTION_TITLES = {
    "floor": "The gRPC floor: server CPU per search against a bare chain",
    "json-door": "The JSON door against gRPC",
}


def page_title(only: str) -> str:
    """The title of the results page a bench-suite run writes, from its ``--only``."""
    return SECTION_TITLES.get(only.strip(), "Serving benchmark")


def _ms(value) -> str:
    return "–" if value is None else f"{value:.1f}"


# How the suite's links were secured with --tls.
TLS_NOTE = "; every link TLS, mutual TLS between gateway and stages, a bearer token per search"


def render_markdown(report: dict) -> str:
    """The serving table, the fault scenarios and the machine they ran on (make bench's page)."""
    m = report["machine"]
    lines = [
        "## Serving benchmark",
        "",
        f"Measured {m['date']} on {m['cpu_model']}, {m['usable_cpus']} usable CPUs "
        f"({m['cpu_count']} online), {m['memory_gib']} GiB, `{m['platform']}`, "
        f"Python {m['python']}, grpcio {m['grpcio']}; load average {m['loadavg_at_start']} at "
        f"start, {m.get('loadavg_at_end', '?')} at the end (other work shares this machine). "
        f"Command: `{m['command']}` (commit {report.get('commit') or '?'}).",
        "",
        f"Artifact set `{report['artifacts']['version']}` "
        f"({report['artifacts']['counts'].get('photos', '?')} photos, "
        f"{report['artifacts']['counts'].get('users', '?')} users; CLIP "
        f"{'yes' if report['artifacts']['clip'] else 'no'}). Three `imgsearch serve` processes "
        f"(gateway, retrieval, ranking{TLS_NOTE if report['settings'].get('tls') else ''}) "
        f"and the load generator (`imgsearch bench`: grpc.aio, "
        f"{report['settings']['channels']} channels, a fourth process) share the same CPUs. "
        f"Each scenario: k={report['settings']['k']} of {report['settings']['candidates_k']} "
        f"candidates, {report['settings']['warmup_s']:g} s warm-up, "
        f"{report['settings']['duration_s']:g} s measured; requests are users and keywords "
        "sampled from the catalogue's conversions. In-process = the same requests through the "
        "same retriever and ranker called directly (no gRPC, no protobuf).",
        "",
        *TABLE_HEADER,
    ]
    for run in report["scenarios"]:
        if "skipped" in run:
            lines.append(f"| {run['name']} | skipped: {run['skipped']} |||||||||||||")
            continue
        lines.append(_row(run["name"], run))
    lines.append("")
    headline = next(
        (
            r
            for r in report["scenarios"]
            if r.get("mode") == "open" and r.get("ranker") == "als" and "latency_ms" in r
        ),
        None,
    )
    if headline is not None:
        p99 = headline["latency_ms"]["p99"]
        cost = headline.get("cpu_ms_per_search", {}).get("total")
        met = (
            headline["achieved_qps"] >= 0.98 * (headline["target_qps"] or 0)
            and p99 is not None
            and p99 <= 30.0
            and headline["error_count"] == 0
        )
        lines += [
            f"Target (keyword + ALS, {headline['load']}: sustained with p99 ≤ 30 ms): "
            f"**{'met' if met else 'not met'}** — achieved {headline['achieved_qps']:.0f} QPS, "
            f"p99 {_ms(p99)} ms, {headline['error_count']} errors, "
            f"{headline['late_sends']} late sends; p99 from the scheduled send "
            f"{_ms(headline['latency_from_schedule_ms']['p99'])} ms; "
            f"{_slow_seconds(headline)} of {len(headline['timeline'])} seconds had a p99 over "
            f"30 ms. The four processes needed {_ms(cost)} ms of CPU per search (a CPU-bound "
            f"ceiling of "
            f"{headline.get('cpu_bound_ceiling_qps', '–')} QPS on this machine's CPUs) while "
            f"other processes kept {_ms(headline.get('other_processes_cores'))} cores busy.",
            "",
        ]
    lines += render_json_door(report)
    lines += floor_lines(report.get("floor"))
    kill = report.get("kill_ranking")
    if kill:
        lines += [
            "### Ranking killed mid-load",
            "",
            f"{kill['retriever']}+{kill['ranker']}, {kill['load']} for {kill['duration_s']:g} s; "
            + "; ".join(f"{e['t']:.1f} s: {e['event']}" for e in kill["events"])
            + ".",
            "",
            "| sent | OK | full | degraded | errors | p99 ms | max ms | degraded after restart "
            "| full after restart |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {kill['sent']} | {kill['ok']} | {kill['full']} | {kill['degraded']} | "
            f"{kill['error_count']} | {_ms(kill['latency_ms']['p99'])} | "
            f"{_ms(kill['latency_ms']['max'])} | {kill['after_restart']['degraded']} | "
            f"{kill['after_restart']['full']} |",
            "",
            "Degraded reasons: "
            + (", ".join(f"{r} × {n}" for r, n in kill["degraded_reasons"].items()) or "none")
            + f". Last degraded response at {_ms(kill['last_degraded_s'])} s, ranking SERVING "
            f"again at {_ms(kill['serving_again_at_s'])} s; full results came back without "
            f"restarting the gateway. Slowest answer {_ms(kill['latency_ms']['max'])} ms against "
            f"a client deadline of {kill['timeout_s'] * 1000:.0f} ms.",
            "",
        ]
    reload = report.get("hot_reload")
    if reload:
        lines += [
            "### Hot reload during load",
            "",
            f"{reload['retriever']}+{reload['ranker']}, {reload['load']} for "
            f"{reload['duration_s']:g} s; "
            + "; ".join(f"{e['t']:.1f} s: {e['event']}" for e in reload["events"])
            + ".",
            "",
            f"**Failed requests: {reload['failed_requests']}** of {reload['sent']} "
            f"(degraded {reload['degraded']}); p99 {_ms(reload['latency_ms']['p99'])} ms, "
            f"max {_ms(reload['latency_ms']['max'])} ms; {reload['responses_on_new_version']} "
            "responses served wholly by the new version. Versions per response: "
            + ", ".join(f"`{v}` × {n}" for v, n in reload["artifact_versions"].items())
            + ".",
            "",
        ]
    lines += _real_clip_lines(report.get("real_clip"))
    reflection = report.get("reflection_client")
    if reflection:
        if "error" in reflection:
            lines += [
                f"Reflection-only client (what ghz does without `--proto`): {reflection['error']}",
                "",
            ]
        else:
            lines += [
                "Reflection-only client (what ghz does without `--proto`: resolve "
                f"`{reflection['symbol']}` by server reflection, build the request from the "
                f"returned descriptors, call `{reflection['method_path']}`): "
                f"{reflection['ok']} of {reflection['calls']} calls OK, errors "
                f"{reflection['errors'] or 0}.",
                "",
            ]
    return "\n".join(lines) + "\n"


def _real_clip_lines(section: dict | None) -> list[str]:
    """The ViT-B-32 section: its set, the text runtime the build chose, its scenarios, target."""
    if not section:
        return []
    lines = [f"### Real-size CLIP: {section.get('model', 'ViT-B-32')} compute, random weights", ""]
    if "error" in section:
        return lines + [f"Not measured: {section['error']}", ""]
    counts = section["artifacts"]["counts"]
    lines.append(
        f"Set `{section['artifacts']['version']}`: the demo generator's "
        f"{counts.get('photos', '?'):,} photos, {counts.get('users', '?')} users, "
        f"{counts.get('conversions', '?'):,} conversions, CLIP {section['model']} with "
        f"{section['weights']}. Hybrid retrieval + ALS, k=10 of 100, a "
        f"{section['scenarios'][0]['timeout_s'] if section['scenarios'] else 2:g} s deadline "
        "per search. Queries: one repeated "
        "query (answered by the query cache), catalogue keywords (their embeddings are stored "
        "with the set), and unique queries (a keyword, another word and a number never sent "
        "before: every one runs the text encoder). No in-process baseline in this section."
    )
    gate = section.get("text_runtime")
    if gate:
        runtimes = "; ".join(
            f"{c['runtime']} {c['batch1_ms']:.1f} ms alone, {c['batch_ms']:.1f} ms/query at batch "
            f"{gate['batch']} (cosine {c['mean_cosine']:.4f}, top-10 {c['top10_overlap']:.2f})"
            for c in gate["candidates"]
        )
        lines.append(f"Text runtime chosen by the build: **{gate['runtime']}** ({runtimes}).")
    if section["scenarios"]:
        lines += ["", *TABLE_HEADER]
        lines += [_row(run["name"], run) for run in section["scenarios"]]
    lines.append("")
    headline = section["scenarios"][-1] if section["scenarios"] else None
    if headline is not None:
        from imgsearch_tools.bench.real_clip import target_met

        target = section["target"]
        lat = headline["latency_ms"]
        lines += [
            f"Target (hybrid + ALS, {headline['load']}, {headline['timeout_s']:g} s deadline: "
            f"≥ {target['qps']:g} QPS sustained with p99 ≤ {target['p99_ms']:g} ms and no error): "
            f"**{'met' if target_met(headline, target) else 'not met'}** — achieved "
            f"{headline['achieved_qps']:.0f} QPS, p50 {_ms(lat['p50'])} ms, p99 "
            f"{_ms(lat['p99'])} ms, {headline['error_count']} errors, "
            f"{headline['late_sends']} late sends; "
            f"{_ms(headline.get('cpu_ms_per_search', {}).get('total'))} ms of CPU per search "
            f"while other processes kept {_ms(headline.get('other_processes_cores'))} cores busy.",
            "",
        ]
    return lines + _overload_lines(section.get("overload"))


def _overload_lines(result: dict | None) -> list[str]:
    """The overload scenario: its three phases, what a refusal cost, and the verdict."""
    if not result:
        return []
    from imgsearch_tools.bench.overload import (
        GOODPUT_SHARE,
        RECOVERY_P99_RATIO,
        REFUSAL_P99_MS,
        SHED_CODE,
    )

    s = result["summary"]
    verdict = result.get("verdict", {})
    lines = [
        "### Overload: 3× capacity offered",
        "",
        f"Capacity measured closed loop (c={result['capacity']['concurrency']}, "
        f"{result['capacity']['duration_s']:g} s), then {s['offered_qps']:g} searches/s offered "
        f"open loop for {result['offer']['duration_s']:g} s, then the closed loop again "
        f"{s['recovery_started_after_offer_s']:g} s after the last offered send; unique queries "
        f"(every one runs the text encoder), a {s['deadline_ms']:.0f} ms deadline, no retries.",
        "",
        "| phase | sent | OK/s | refused (RESOURCE_EXHAUSTED) | other errors | p50 ms | p99 ms "
        "| max ms | refusals p50 / p99 ms "
        "| CPU (cores): gateway · retrieval · ranking · load gen |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for phase in ("capacity", "offer", "recovery"):
        run = result[phase]
        lat = run["latency_ms"]
        refused = run["codes"].get(SHED_CODE, 0)
        refusals = run["error_latency_ms"].get(SHED_CODE, {})
        others = {c: n for c, n in run["errors"].items() if c != SHED_CODE}
        cpu = run.get("cpu_percent", {})
        cores = " · ".join(
            f"{cpu[k] / 100:.2f}" if k in cpu else "–"
            for k in ("gateway", "retrieval", "ranking", LOADGEN)
        )
        lines.append(
            f"| {phase} ({run['load']}) | {run['sent']} | {run['achieved_qps']:.0f} | {refused} | "
            f"{', '.join(f'{c} {n}' for c, n in others.items()) or 0} | {_ms(lat['p50'])} | "
            f"{_ms(lat['p99'])} | {_ms(lat['max'])} | {_ms(refusals.get('p50'))} / "
            f"{_ms(refusals.get('p99'))} | {cores} |"
        )
    cost = s.get("refusal_cpu_ms") or {}
    lines.append("")
    if cost:
        lines.append(
            "CPU per refused search (the offer's CPU beyond what its successes cost at the "
            "capacity run's rate, over the refusals): "
            + " · ".join(f"{name} {ms:.3f} ms" for name, ms in cost.items() if name != "total")
            + f" = **{cost['total']:.3f} ms**."
        )
    checks = [
        (
            "goodput",
            f"goodput ≥ {GOODPUT_SHARE:.0%} of capacity: {s['goodput_qps']:.0f} of "
            f"{s['capacity_qps']:.0f} QPS ({s['goodput_share']:.0%})",
        ),
        (
            "successes_within_deadline",
            f"successes within the deadline: slowest {_ms(s['success_max_ms'])} ms",
        ),
        (
            "fast_refusals",
            f"refusals within {REFUSAL_P99_MS:g} ms (p99): {_ms(s['refusal_p99_ms'])} ms",
        ),
        ("no_crash", f"no crash: exit codes {s['exit_codes']}"),
        (
            "recovered",
            f"p99 after ≤ {RECOVERY_P99_RATIO:g}× before: {_ms(s['after_p99_ms'])} vs "
            f"{_ms(s['before_p99_ms'])} ms (×{s['after_over_before_p99']})",
        ),
    ]
    met = all(verdict.get(key) for key, _ in checks)
    lines += [
        "",
        f"Overload without collapse: **{'met' if met else 'not met'}** — "
        + "; ".join(f"{text} ({'yes' if verdict.get(key) else 'no'})" for key, text in checks)
        + f". Shed share {s['shed_share']:.0%}; the load generator used "
        f"{s['loadgen_cpu_cores_during_offer']:.2f} cores during the offer.",
        "",
    ]
    return lines


def _slow_seconds(run: dict, limit_ms: float = 30.0) -> int:
    """Seconds of the run whose replies had a p99 latency over ``limit_ms``."""
    return sum(1 for row in run["timeline"] if (row.get("p99_ms") or 0.0) > limit_ms)


def _row(name: str, run: dict) -> str:
    lat = run["latency_ms"]
    cost = run.get("cpu_ms_per_search", {})
    shares = " · ".join(
        f"{cost[k]:.2f}" if k in cost else "–" for k in ("gateway", "retrieval", "ranking", LOADGEN)
    )
    if "total" in cost:
        shares += f" = **{cost['total']:.2f}**"
    cores = sum(run.get("cpu_percent", {}).values()) / 100.0
    ceiling = run.get("cpu_bound_ceiling_qps")
    ratio = run.get("e2e_over_in_process_p50")
    local = run.get("in_process", {}).get("latency_ms", {}).get("p50")
    errors = run["error_count"]
    if run["errors"]:
        errors = f"{errors} ({', '.join(f'{c} {n}' for c, n in run['errors'].items())})"
    return (
        f"| {name} | {run['achieved_qps']:.0f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
        f"{_ms(lat['p99'])} | {_ms(lat['max'])} | {errors} | {run['degraded']} | "
        f"{'–' if local is None else f'{local:.2f}'} | "
        f"{'–' if ratio is None else f'{ratio:.1f}×'} | {shares} | "
        f"{'–' if ceiling is None else ceiling} | {cores:.2f} | "
        f"{_ms(run.get('other_processes_cores'))} |"
    )
