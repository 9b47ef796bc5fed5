"""CancelBoard: a Cancel stops the running and waiting jobs of its own page session and nothing else."""

from __future__ import annotations

import threading

from jointdit.ui.jobs import CancelBoard, CancelOutcome


def test_cancel_sets_only_the_flags_of_its_own_session():
    board = CancelBoard()
    a, b = board.ticket("A"), board.ticket("B")
    with board.job("A", a) as flag_a, board.job("B", b) as flag_b:
        assert board.cancel("B") == CancelOutcome(running=1, waiting=0)
        assert flag_b.is_set() and not flag_a.is_set()
    assert board.cancel("A") == CancelOutcome(running=0, waiting=0)   # A's job ended: nothing left to stop


def test_a_job_cancelled_while_waiting_starts_with_its_flag_set():
    board = CancelBoard()
    running, waiting = board.ticket("A"), board.ticket("A")
    with board.job("A", running) as first:
        outcome = board.cancel("A")
        assert outcome == CancelOutcome(running=1, waiting=1) and outcome.any and first.is_set()
    with board.job("A", waiting) as second:
        assert second.is_set()                   # stops before its first step


def test_a_cancel_with_nothing_running_does_not_stop_a_later_job():
    board = CancelBoard()
    assert not board.cancel("A").any
    with board.job("A", board.ticket("A")) as flag:
        assert not flag.is_set()
    with board.job("A", None) as flag:           # no ticket (called outside the page): a flag of its own
        assert not flag.is_set() and board.cancel("A") == CancelOutcome(running=1, waiting=0) and flag.is_set()


def test_a_second_cancel_counts_the_running_job_again_but_no_waiting_one_twice():
    board = CancelBoard()
    first, queued = board.ticket("A"), board.ticket("A")
    with board.job("A", first):
        assert board.cancel("A") == CancelOutcome(running=1, waiting=1)
        assert board.cancel("A") == CancelOutcome(running=1, waiting=0)
    with board.job("A", queued) as flag:
        assert flag.is_set()


def test_a_job_that_fails_forgets_its_ticket():
    board = CancelBoard()
    ticket = board.ticket("A")
    try:
        with board.job("A", ticket):
            raise RuntimeError("sampling failed")
    except RuntimeError:
        pass
    assert not board.cancel("A").any


def test_tickets_taken_from_many_threads_are_distinct():
    board, tickets = CancelBoard(), []
    threads = [threading.Thread(target=lambda: tickets.extend(board.ticket("A") for _ in range(100))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tickets)) == 400 and board.cancel("A") == CancelOutcome(running=0, waiting=400)
