"""The requests a gateway has admitted and not finished, and how far its shutdown has gone.

The gatekeeper lets no request in once the gateway drains (``is_draining``); the OpenAI routes
add each admitted request (``admitted``) and take it out when it ends (``finished``);
``Gateway.drain`` ends those still running when the grace period is over (``end_all``), and a
request admitted after that is ended as it comes in. Torch-free; one event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ShuttingDown
from gateway.generation import Generation

__all__ = ["RequestsInFlight"]


@dataclass(slots=True, eq=False)
class RequestsInFlight:
    generations: set[Generation] = field(default_factory=set)
    is_draining: bool = False  # no new request is let in
    is_ending: bool = False  # the grace period is over: what is admitted now is ended

    def admitted(self, generation: Generation) -> None:
        self.generations.add(generation)
        if self.is_ending:  # the grace period ended while this one was being admitted
            generation.interrupt(ShuttingDown("the gateway is shutting down; retry"))

    def finished(self, generation: Generation) -> None:
        self.generations.discard(generation)

    def end_all(self, error: ShuttingDown) -> None:
        """End every request still running with ``error`` (each ends by its own clean-up)."""
        for generation in list(self.generations):
            generation.interrupt(error)
