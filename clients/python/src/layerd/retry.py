"""The retry policy of unary calls."""
import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class Retry:
    """How unary calls are retried: on UNAVAILABLE only — the server shed the call
    (reason OVERLOADED), is shutting down or restarting, or cannot be reached — with
    capped exponential backoff and jitter: after failed attempt n the client waits a
    random time between half and all of min(max_backoff, initial_backoff * multiplier**(n-1)).
    The defaults wait 0.2 s, 0.4 s, 0.8 s, 1.6 s, 3.2 s (each halved at random), about
    3 to 6 s in all: long enough to ride out a replica restart or a load balancer moving
    a session's range, short enough to report a server that is gone.

    Every other code is raised at once: retrying the same request cannot change
    INVALID_ARGUMENT, NOT_FOUND (recreate the session), FAILED_PRECONDITION,
    RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED. `Retry(attempts=1)` turns retries off.
    Run streams are never retried.
    """
    attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)
