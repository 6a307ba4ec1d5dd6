"""Launch backoff: how long an app that keeps failing waits before its next launch.

Marathon's rate limiter (specs/marathon-api.md §4.2), per app *configuration* (so a new
configuration starts without delay):

    first failure    delay = min(backoffSeconds, maxLaunchDelaySeconds)
    each one after   delay = min(delay * backoffFactor, maxLaunchDelaySeconds)
    deadline         = time of the failure + delay; nothing is launched before it
    running again    the reference time moves to now (the delay value is kept)
    forgotten        when now > reference + maxLaunchDelaySeconds, on DELETE
                     /v2/queue/{id}/delay, and when a restart begins or a stop ends

Failed, Error, Finished, Gone and Dropped count as failures; Killed does not. Pure: time is
an argument.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Delay:
    """The current delay of one app configuration."""

    config_version: str
    seconds: float
    deadline: float
    reference: float

    def time_left(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def waiting(self, now: float) -> bool:
        return now < self.deadline


def failed(delay: Delay | None, app: dict, config_version: str, now: float) -> Delay:
    """The delay after one more failure of `app` (in configuration `config_version`)."""
    cap = float(app.get("maxLaunchDelaySeconds", 300))
    if delay is None or delay.config_version != config_version:
        seconds = min(float(app.get("backoffSeconds", 1)), cap)
    else:
        seconds = min(delay.seconds * float(app.get("backoffFactor", 1.15)), cap)
    return Delay(config_version, seconds, now + seconds, now)


def advanced(delay: Delay, now: float) -> Delay:
    """An instance of the app started (staging, starting, running): keep the delay value,
    move its reference time."""
    return attrs.evolve(delay, reference=now)


def expired(delay: Delay, app: dict | None, config_version: str | None, now: float) -> bool:
    """Whether the delay should be forgotten: stale (its app or configuration is gone) or
    nothing has failed for maxLaunchDelaySeconds."""
    if app is None or config_version != delay.config_version:
        return True
    return now > delay.reference + float(app.get("maxLaunchDelaySeconds", 300)) and \
        not delay.waiting(now)
