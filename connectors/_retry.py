"""When to retry a SCIM call, and how long to wait first: one value object per target.

The policy only decides; :meth:`connectors.ScimClient.send` is the one place
that applies it. Strategies are tenacity's, composed once from config values:

- a 429 with ``Retry-After`` (or a 5xx with one): wait that long, capped by
  ``max_retry_after``, if it is no longer than ``wait_in_place``; a longer one is
  not waited here (it would hold the worker and every request queued behind it):
  the call raises, and the caller puts the work off until then (:meth:`RetryPolicy.defers`);
- a 429 without it, 500/502/503/504, a timeout, a connection error, a success
  status with a body we cannot read: exponential backoff with full jitter,
  ``uniform(0, min(cap, base * 2 ** (attempt - 1)))``;
- anything else (other 4xx, 401 after a refresh, 501, 505…): not retried here.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from connectors._errors import InvalidResponse, ScimError, TransientError

# RFC 9110 §15.6: the server errors that say "try again"; 501 and 505 do not.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


def _utcnow() -> datetime:
    return datetime.now(UTC)


def is_retryable(error: BaseException) -> bool:
    """Whether another attempt of the same request may succeed soon."""
    if not isinstance(error, TransientError):
        return False
    if error.scim_type == "mutability":
        # RFC 7644 §3.12: the attribute cannot be changed; some targets say so with a 500. Never soon.
        return False
    # No status: a timeout or a connection error. InvalidResponse: a success status, garbled.
    return error.status is None or isinstance(error, InvalidResponse) or error.status in RETRYABLE_STATUSES


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with backoff, built once per target from its config.

    ``sleep`` and ``now`` (the wall clock that turns a ``Retry-After`` HTTP-date
    into seconds) are injectable: tests record waits instead of waiting.
    """

    max_attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0
    # A Retry-After up to this many seconds is waited in place; a longer one is handed to the caller
    # (by default every one is waited here; an engine with a queue sets a few seconds).
    wait_in_place: float = math.inf
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False, compare=False)
    now: Callable[[], datetime] = field(default=_utcnow, repr=False, compare=False)
    _backoff: wait_random_exponential = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"backoff needs 0 < base <= cap, not base={self.base}, cap={self.cap}")
        if self.max_retry_after < 0:
            raise ValueError(f"max_retry_after must not be negative, not {self.max_retry_after}")
        if self.wait_in_place < 0:
            raise ValueError(f"wait_in_place must not be negative, not {self.wait_in_place}")
        # Full jitter (tenacity's name for it): uniform(0, min(cap, base * 2 ** (attempt - 1))).
        object.__setattr__(self, "_backoff", wait_random_exponential(multiplier=self.base, max=self.cap))

    def defers(self, error: BaseException) -> bool:
        """Whether the target asked for a wait (``Retry-After``) too long to spend in place.

        The call that got it is not retried here; the caller schedules the work for
        ``error.retry_after`` seconds later and goes on with other work meanwhile.
        """
        return isinstance(error, ScimError) and error.retry_after is not None and error.retry_after > self.wait_in_place

    def delay(self, retry_state: RetryCallState) -> float:
        """Seconds to wait before the next attempt, after the one that just failed."""
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, ScimError) and error.retry_after is not None:
            return min(max(error.retry_after, 0.0), self.max_retry_after)
        return float(self._backoff(retry_state))

    def retrying(
        self,
        *,
        before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
        ambiguous: bool = True,
    ) -> AsyncRetrying:
        """A fresh tenacity controller for one call (they hold per-call state: never share one).

        ``ambiguous=False``: a failure after which the server may have applied the request
        (no answer, a garbled one) is not retried here; the caller decides (a create looks first).
        """

        def retryable(error: BaseException) -> bool:
            if self.defers(error):
                return False
            if not ambiguous and isinstance(error, TransientError) and error.ambiguous:
                return False
            return is_retryable(error)

        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self.delay,
            retry=retry_if_exception(retryable),
            sleep=self.sleep,
            before_sleep=before_sleep,
            # The caller gets the last TransientError itself, not tenacity's RetryError.
            reraise=True,
        )
