"""The circuit breaker in front of ranking: verdicts on its calls, skipping it while it fails."""

from __future__ import annotations

import enum
import time

import grpc


class Verdict(enum.Enum):
    """What one ranking call says about ranking's health."""

    ANSWERED = "answered"  # ranking is up: a response, or a refusal of its own choosing
    FAILED = "failed"  # ranking is down, broken, or too slow for a fair budget
    NONE = "none"  # nothing learned: the caller gave up, or left ranking too little time


# Codes that mean ranking itself failed. RESOURCE_EXHAUSTED is ranking shedding load (it is
# up and answers at once), and a refusal of the request (INVALID_ARGUMENT...) is an answer.
RANKING_FAILURES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    # Not our cancellation (that raises asyncio.CancelledError): ranking or its host dropped it.
    grpc.StatusCode.CANCELLED,
}


def verdict(code: grpc.StatusCode, given_s: float, fair_s: float) -> Verdict:
    """Judge a failed ranking call by its status ``code``.

    A DEADLINE_EXCEEDED counts against ranking only when it was given at least ``fair_s``
    (the configured ranking budget): a client whose own deadline left ranking less has run
    out of time itself, and must not open the breaker for everyone else.
    """
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Verdict.FAILED if given_s >= fair_s else Verdict.NONE
    return Verdict.FAILED if code in RANKING_FAILURES else Verdict.ANSWERED


class CircuitBreaker:
    """Skips a failing downstream for a while so searches degrade at once instead of waiting.

    Closed, calls go through, and ``threshold`` consecutive failures open it. Open, calls are
    refused for ``cooldown_s``; then exactly one call goes through as a probe (half-open) while
    every other call is still refused until the probe's verdict: an answer closes the breaker,
    a failure opens it for another cooldown, and a probe that ends without a verdict (its
    client cancelled, or had too little budget) hands the probe to the next call.
    """

    def __init__(self, threshold: int = 3, cooldown_s: float = 1.0, clock=time.monotonic):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.open_until: float | None = None  # None: closed
        self.probing = False

    def acquire(self) -> str | None:
        """A permit for one call ("call" or "probe"), or None when the call must be skipped."""
        if self.open_until is None:
            return "call"
        if self.probing or self.clock() < self.open_until:
            return None
        self.probing = True
        return "probe"

    def record(self, permit: str, outcome: Verdict) -> None:
        """The verdict of a call made under ``permit``."""
        if permit == "probe":
            self.probing = False
            if outcome is Verdict.ANSWERED:
                self.open_until, self.failures = None, 0
            elif outcome is Verdict.FAILED:
                self.open_until = self.clock() + self.cooldown_s
            return
        if self.open_until is not None:
            return  # a call that started before the breaker opened: the probe decides now
        if outcome is Verdict.ANSWERED:
            self.failures = 0
        elif outcome is Verdict.FAILED:
            self.failures += 1
            if self.failures >= self.threshold:
                self.open_until = self.clock() + self.cooldown_s
                self.failures = 0


class RankingCall:
    """One call to ranking under the breaker; its verdict is recorded exactly once.

    Parameters
    ----------
    breaker:
        The ranking breaker the permit came from.
    permit:
        From :meth:`CircuitBreaker.acquire`.
    call:
        The started grpc.aio call.
    given_s, fair_s:
        The timeout it was given, and the ranking budget a timeout is judged against.
    """

    def __init__(self, breaker: CircuitBreaker, permit: str, call, given_s: float, fair_s: float):
        self.breaker = breaker
        self.permit = permit
        self.call = call
        self.given_s = given_s
        self.fair_s = fair_s
        self.started = time.perf_counter()
        self.recorded = False

    def _record(self, outcome: Verdict) -> None:
        if not self.recorded:
            self.recorded = True
            self.breaker.record(self.permit, outcome)

    async def result(self):
        """The response; raises the call's AioRpcError (or CancelledError) after judging it."""
        try:
            response = await self.call
        except grpc.aio.AioRpcError as exc:
            self._record(verdict(exc.code(), self.given_s, self.fair_s))
            raise
        except BaseException:
            self.cancel()
            raise
        self._record(Verdict.ANSWERED)
        return response

    def cancel(self) -> None:
        """Give up on the call (cancelled at ranking too); nothing is learned from it."""
        if not self.call.done():
            self.call.cancel()
        self._record(Verdict.NONE)
