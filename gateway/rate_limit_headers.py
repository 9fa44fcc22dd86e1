"""OpenAI's rate-limit headers, from a request's quota state (``gateway.quotas_backend``'s
``RateLimitState``)::

    x-ratelimit-limit-requests      the requests per minute allowed      "60"
    x-ratelimit-remaining-requests  how many more fit in the window now  "59"
    x-ratelimit-reset-requests      until the window is back to its limit "1s", "6m0s", "20ms"
    x-ratelimit-limit-tokens        the tokens per minute allowed
    x-ratelimit-remaining-tokens    how many more fit now
    x-ratelimit-reset-tokens        until the window is back to its limit

Each pair is the tightest of the request's scopes (its tenant's overall limits, its model's, its
API key's): the one with the least remaining. A tenant with no requests-per-minute limit in any
scope gets no ``*-requests`` headers, and likewise for tokens: there is no limit to report.
Durations are written as OpenAI writes them (Go's ``time.Duration``: ``"1m30s"``, ``"1.5s"``,
``"250ms"``). Torch-free.
"""

from __future__ import annotations

from gateway.quotas_backend import RateLimitState

__all__ = ["duration_text", "rate_limit_headers"]


def rate_limit_headers(state: RateLimitState) -> dict[str, str]:
    """The headers for ``state``; none for a limit no scope has."""
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset_s in (
        ("requests", state.limit_requests, state.remaining_requests, state.reset_requests_s),
        ("tokens", state.limit_tokens, state.remaining_tokens, state.reset_tokens_s),
    ):
        if limit is None or remaining is None or reset_s is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
        headers[f"x-ratelimit-reset-{kind}"] = duration_text(reset_s)
    return headers


def duration_text(seconds: float) -> str:
    """``seconds`` as Go prints a duration, to the millisecond: ``"0s"``, ``"20ms"``,
    ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    whole, fraction = divmod(ms, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text
