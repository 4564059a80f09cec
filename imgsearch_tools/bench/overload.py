"""The suite's overload scenario: capacity closed loop, 3x that offered open loop, then recovery.

Some load always exceeds capacity (a burst, a lost replica, a retry storm). This scenario
measures what the services do then: it finds the capacity with a closed loop, offers a multiple
of it open loop with unique queries (every one runs the text encoder), and checks that the
servers keep serving about their capacity, refuse the excess fast, and are back to their
normal latency a few seconds after the offer stops.
"""

from __future__ import annotations

import asyncio
import time

from imgsearch_tools.bench.processes import LOADGEN, CpuMeter, ServiceProcesses
from imgsearch_tools.bench.scenarios import CANDIDATES_K, K, say

CAPACITY_CONCURRENCY = 8
CAPACITY_S = 15.0
OFFER_FACTOR = 3.0
OFFER_S = 20.0
RECOVERY_GAP_S = 5.0  # after the last offered send, before the recovery run starts
DEADLINE_S = 2.0
# What "without collapse" means, checked by overload_verdict.
GOODPUT_SHARE = 0.75  # of the capacity, while 3x capacity is offered
REFUSAL_P99_MS = 50.0
RECOVERY_P99_RATIO = 1.2  # recovery run's p99 over the capacity run's
SHED_CODE = "RESOURCE_EXHAUSTED"


def _spec(target: str, channels: int, retriever: str, ranker: str, **load):
    from imgsearch_tools.bench import load as bench

    return bench.LoadSpec(
        target=target,
        retriever=retriever,
        ranker=ranker,
        k=K,
        candidates_k=CANDIDATES_K,
        channels=channels,
        timeout_s=DEADLINE_S,
        unique_share=1.0,
        **load,
    )


async def _phase(services: ServiceProcesses, spec, queries, marks: dict, security=None) -> dict:
    """One load phase with each process's CPU over its measured part."""
    from imgsearch_tools.bench import load as bench

    meter = CpuMeter(services)

    def on_start() -> None:
        marks["start"] = time.perf_counter()
        meter.start()

    result = await bench.run_load(spec, queries, on_measure_start=on_start, security=security)
    meter.record(result)
    used, _ = meter.used()
    result["cpu_s"] = {name: round(seconds, 3) for name, seconds in used.items()}
    return result


def refusal_cost(capacity: dict, offer: dict) -> dict[str, float] | None:
    """CPU ms one refused search cost each process while the offer ran, estimated.

    The offer's CPU per process minus what its successful searches cost at the capacity run's
    rate per search, divided by the requests that did not succeed (almost all refused at the
    first door). None when nothing was refused.
    """
    refused = offer["completed"] - offer["ok"]
    if refused <= 0 or not capacity.get("completed"):
        return None
    cost = {}
    for name, seconds in offer["cpu_s"].items():
        per_search = capacity["cpu_s"].get(name, 0.0) / capacity["completed"]
        cost[name] = round(max(0.0, seconds - per_search * offer["ok"]) * 1000 / refused, 3)
    cost["total"] = round(sum(cost.values()), 3)
    return cost


def summarise(capacity: dict, offer: dict, recovery: dict, exit_codes: dict | None) -> dict:
    """The figures the scenario is judged by (latencies in ms)."""
    window = offer["duration_s"]
    refused = offer["codes"].get(SHED_CODE, 0)
    refusals = offer["error_latency_ms"].get(SHED_CODE, {})
    before_p99 = capacity["latency_ms"]["p99"]
    after_p99 = recovery["latency_ms"]["p99"]
    return {
        "capacity_qps": capacity["achieved_qps"],
        "offered_qps": offer["target_qps"],
        "goodput_qps": offer["achieved_qps"],
        "goodput_share": (
            round(offer["achieved_qps"] / capacity["achieved_qps"], 3)
            if capacity["achieved_qps"]
            else None
        ),
        "shed_share": round(refused / offer["sent"], 3) if offer["sent"] else None,
        "refused_per_s": round(refused / window, 1),
        "other_errors": {c: n for c, n in offer["errors"].items() if c != SHED_CODE},
        "success_p99_ms": offer["latency_ms"]["p99"],
        "success_max_ms": offer["latency_ms"]["max"],
        "refusal_p99_ms": refusals.get("p99"),
        "refusal_max_ms": refusals.get("max"),
        "deadline_ms": DEADLINE_S * 1000,
        "before_p99_ms": before_p99,
        "after_p99_ms": after_p99,
        "after_over_before_p99": (
            round(after_p99 / before_p99, 3) if before_p99 and after_p99 else None
        ),
        "recovery_started_after_offer_s": recovery.get("started_after_offer_s"),
        "loadgen_cpu_cores_during_offer": round(offer["cpu_percent"].get(LOADGEN, 0.0) / 100, 2),
        "refusal_cpu_ms": refusal_cost(capacity, offer),
        "exit_codes": exit_codes,
    }


def overload_verdict(summary: dict) -> dict[str, bool]:
    """Each criterion of "overload without collapse", met or not."""
    crashed = summary["exit_codes"] is not None and any(summary["exit_codes"].values())
    return {
        "goodput": (summary["goodput_share"] or 0.0) >= GOODPUT_SHARE,
        "successes_within_deadline": (
            summary["success_max_ms"] is not None
            and summary["success_max_ms"] < summary["deadline_ms"]
            and "DEADLINE_EXCEEDED" not in summary["other_errors"]
        ),
        "fast_refusals": (
            summary["refusal_p99_ms"] is None or summary["refusal_p99_ms"] <= REFUSAL_P99_MS
        ),
        "no_crash": not crashed
        and not {"INTERNAL", "UNKNOWN", "UNAVAILABLE"} & set(summary["other_errors"]),
        "recovered": (
            summary["after_over_before_p99"] is not None
            and summary["after_over_before_p99"] <= RECOVERY_P99_RATIO
        ),
    }


async def overload_scenario(
    services: ServiceProcesses,
    target: str,
    queries,
    channels: int = 2,
    warmup_s: float = 2.0,
    retriever: str = "hybrid",
    ranker: str = "als",
    capacity_s: float = CAPACITY_S,
    offer_s: float = OFFER_S,
    security=None,
) -> dict:
    """Capacity (closed loop), ``OFFER_FACTOR`` times it offered (open loop), then recovery.

    Every phase sends unique queries with a ``DEADLINE_S`` deadline. The recovery run is the
    capacity run again, started ``RECOVERY_GAP_S`` after the offer's last send, without
    warm-up. ``security``: the client's TLS and token (the suite's ``--tls``). Returns the
    three phases and their summary (exit codes are added by the caller once the services are
    stopped; see :func:`summarise`).
    """
    say(f"overload: capacity, closed c={CAPACITY_CONCURRENCY} for {capacity_s:g} s")
    marks: dict = {}

    def closed_loop(warmup: float):
        return _spec(
            target,
            channels,
            retriever,
            ranker,
            concurrency=CAPACITY_CONCURRENCY,
            duration_s=capacity_s,
            warmup_s=warmup,
        )

    capacity = await _phase(services, closed_loop(warmup_s), queries, marks, security)
    offered = round(max(1.0, capacity["achieved_qps"]) * OFFER_FACTOR, 1)
    say(f"overload: capacity {capacity['achieved_qps']} QPS; offering {offered} for {offer_s:g} s")
    offer_spec = _spec(
        target, channels, retriever, ranker, qps=offered, duration_s=offer_s, warmup_s=0.0
    )
    offer = await _phase(services, offer_spec, queries, marks, security)
    stopped = marks["start"] + offer["last_send_s"]
    await asyncio.sleep(max(0.0, stopped + RECOVERY_GAP_S - time.perf_counter()))
    recovery = await _phase(services, closed_loop(0.0), queries, marks, security)
    recovery["started_after_offer_s"] = round(marks["start"] - stopped, 2)
    result = {
        "capacity": capacity,
        "offer": offer,
        "recovery": recovery,
        "summary": summarise(capacity, offer, recovery, None),
    }
    say(f"overload: {result['summary']}")
    return result


def finish(result: dict, exit_codes: dict) -> dict:
    """Add the services' exit codes (after the scenario) to the summary and judge it."""
    result["summary"] = summarise(
        result["capacity"], result["offer"], result["recovery"], exit_codes
    )
    result["verdict"] = overload_verdict(result["summary"])
    return result
