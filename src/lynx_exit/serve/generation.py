"""One HTTP request in flight: its choices' tickets, their text, and what the client is sent.

A request with `n` choices (and, for completions, several prompts) becomes one engine request
per choice. Their events arrive on one asyncio queue; `updates` turns them into text deltas,
aborting a choice as soon as a stop string matches, and coalesces everything that has arrived
since the last read, so a slow client gets fewer, larger chunks instead of falling behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lynx_exit.serve.protocol import APIError
from lynx_exit.serve.text import ChoiceText
from lynx_exit.serve.worker import EngineWorker, Event, Failure, Finish, PointEvent, Ticket, TokenEvent


@dataclass
class ChoiceUpdate:
    choice: int
    reasoning: str
    content: str
    finish: Finish | None  # set on the choice's last update
    points: list[dict[str, Any]] = field(
        default_factory=list
    )  # decision points passed (when the client asked)


class Generation:
    def __init__(
        self,
        worker: EngineWorker,
        tickets: list[Ticket],
        texts: list[ChoiceText],
        on_finish: Callable[[Ticket, Finish | Failure, bool], None],  # bool: a stop string ended the choice
    ) -> None:
        self.worker = worker
        self.tickets = tickets
        self.texts = texts
        self._on_finish = on_finish
        self._queue: asyncio.Queue[tuple[int, list[Event]]] = asyncio.Queue()
        self._open = set(range(len(tickets)))  # choices the engine has not finished
        self._stopped: set[int] = set()  # choices aborted because a stop string matched
        self.finishes: dict[int, Finish] = {}
        for ticket in tickets:
            ticket.deliver = self._deliver

    def start(self) -> None:
        self.worker.submit(self.tickets)

    def _deliver(self, choice: int, events: list[Event]) -> None:
        """On the event loop, from the worker; runs even when nobody reads this request any more."""
        last = events[-1]
        if isinstance(last, Finish | Failure) and choice in self._open:
            self._open.discard(choice)
            self._on_finish(self.tickets[choice], last, choice in self._stopped)
        self._queue.put_nowait((choice, events))

    def cancel(self) -> None:
        """Abort the choices still running (client gone, or the request failed)."""
        running = [self.tickets[c] for c in sorted(self._open)]
        if running:
            self.worker.abort(running)

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        """Deltas of every choice that advanced, until all have finished; a failure raises `APIError`."""
        pending = set(range(len(self.tickets)))
        while pending:
            arrived = [await self._queue.get()]
            while not self._queue.empty():
                arrived.append(self._queue.get_nowait())
            touched: dict[int, Finish | None] = {}
            points: dict[int, list[dict[str, Any]]] = {}
            for choice, events in arrived:
                touched.setdefault(choice, None)
                for event in events:
                    if isinstance(event, TokenEvent):
                        self.texts[choice].push(event.text, event.phase)
                    elif isinstance(event, PointEvent):  # where in the reasoning it is: the characters so far
                        points.setdefault(choice, []).append(
                            {**asdict(event), "chars": len(self.texts[choice].reasoning)}
                        )
                    elif isinstance(event, Finish):
                        touched[choice] = self.finishes[choice] = event
                        pending.discard(choice)
                    else:
                        self.cancel()
                        raise APIError(event.status, event.message, kind="server_error", code=event.code)
                if self.texts[choice].stopped and choice in self._open and choice not in self._stopped:
                    self.worker.abort([self.tickets[choice]])  # its `Finish` (reason "abort") still comes
                    self._stopped.add(choice)
            out = []
            for choice, finish in touched.items():
                reasoning, content = self.texts[choice].take(final=finish is not None)
                if reasoning or content or finish is not None or choice in points:
                    out.append(ChoiceUpdate(choice, reasoning, content, finish, points.get(choice, [])))
            if out:
                yield out

    async def run(self) -> None:
        async for _ in self.updates():
            pass
