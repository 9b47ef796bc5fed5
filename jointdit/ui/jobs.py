"""Which sampling jobs a Cancel click stops: only those of the page that pressed it.

Every page load of the studio is one Gradio session (``gr.Request.session_hash``; two browser tabs or two
browsers are two sessions). Per session, the board keeps:

- a ticket per Generate click, taken the moment it is pressed (:meth:`CancelBoard.ticket`, outside the
  queue) and handed to the queued job, so a job still waiting behind another page's job can be cancelled;
- when the queue starts the job, :meth:`CancelBoard.job` turns its ticket into the cancel flag the sampler
  checks before every step (already set if the ticket was cancelled while waiting), and forgets the
  ticket when the job ends, however it ends.

:meth:`CancelBoard.cancel` sets the flags of the session's running jobs and marks its waiting tickets;
flags and tickets of other sessions are never touched, and a Cancel with nothing of its session running
or waiting changes nothing (it cannot stop a later job).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class CancelOutcome:
    running: int    # jobs of the session that stop before their next step
    waiting: int    # jobs of the session still in the queue, which stop before their first step

    @property
    def any(self) -> bool:
        return bool(self.running or self.waiting)


class CancelBoard:
    """Cancel flags per page session; thread-safe (Gradio runs handlers on worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = itertools.count(1)
        self._flags: dict[str, dict[str, threading.Event]] = {}    # session -> ticket -> flag
        self._started: set[str] = set()                            # tickets whose job is running

    def ticket(self, session: str) -> str:
        """Register a Generate click of ``session``; the queued job passes the ticket to :meth:`job`."""
        ticket = f"job-{next(self._count)}"
        with self._lock:
            self._flags.setdefault(session, {})[ticket] = threading.Event()
        return ticket

    @contextmanager
    def job(self, session: str, ticket: str | None) -> Iterator[threading.Event]:
        """The running job of ``ticket``: yields its cancel flag, then forgets the ticket.

        A missing or unknown ticket (a call from outside the page) gets a fresh flag of its own."""
        with self._lock:
            tickets = self._flags.setdefault(session, {})
            if not ticket or ticket not in tickets:
                ticket = f"job-{next(self._count)}"
                tickets[ticket] = threading.Event()
            flag = tickets[ticket]
            self._started.add(ticket)
        try:
            yield flag
        finally:
            with self._lock:
                self._started.discard(ticket)
                tickets = self._flags.get(session, {})
                tickets.pop(ticket, None)
                if not tickets:
                    self._flags.pop(session, None)

    def cancel(self, session: str) -> CancelOutcome:
        """Stop every running and waiting job of ``session``, and nothing else."""
        running = waiting = 0
        with self._lock:
            for ticket, flag in self._flags.get(session, {}).items():
                if ticket in self._started:
                    running += 1
                elif not flag.is_set():
                    waiting += 1
                flag.set()
        return CancelOutcome(running=running, waiting=waiting)
