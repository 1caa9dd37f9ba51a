"""service.bookkeeping: per-request figures recorded after the answer, in order, never lost,
and always flushed before anything reads them."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import generate_latest

from service.bookkeeping import Bookkeeping
from service.metrics import Metrics


def test_without_an_event_loop_calls_run_at_once():
    later, seen = Bookkeeping(), []
    later(seen.append, 1)
    assert seen == [1]
    assert len(later) == 0


def test_calls_wait_for_the_end_of_the_step_and_run_in_order():
    async def step():
        later, seen = Bookkeeping(), []
        for n in range(5):
            later(seen.append, n)
        assert seen == []  # nothing done in the request's own step
        assert len(later) == 5
        await asyncio.sleep(0)  # the next loop step
        assert seen == [0, 1, 2, 3, 4]
        assert len(later) == 0
        later(seen.append, 5)  # scheduled again once drained
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(step()) == [0, 1, 2, 3, 4, 5]


def test_a_failing_call_does_not_stop_the_ones_after_it(caplog):
    async def step():
        later, seen = Bookkeeping(), []
        later(seen.append, "before")
        later(lambda: 1 / 0)
        later(seen.append, "after")
        later.flush()
        return seen

    logger = logging.getLogger("bnserve.bookkeeping")
    logger.addHandler(caplog.handler)  # bnserve's loggers may not propagate (configure_logging)
    try:
        assert asyncio.run(step()) == ["before", "after"]
    finally:
        logger.removeHandler(caplog.handler)
    assert "bookkeeping call" in caplog.text
    assert "ZeroDivisionError" in caplog.text


def test_a_scrape_flushes_what_is_pending_first():
    async def step():
        metrics = Metrics()
        metrics.later(metrics.compute_time.labels("digits").observe, 0.002)
        text = generate_latest(metrics.registry).decode()  # before the loop ran the callback
        return text, len(metrics.later)

    text, pending = asyncio.run(step())
    assert 'bnserve_compute_duration_seconds_count{model="digits"} 1.0' in text
    assert pending == 0


def test_a_loop_that_closed_before_its_flush_does_not_strand_later_calls():
    later, seen = Bookkeeping(), []
    loop = asyncio.new_event_loop()

    def answer_then_stop():
        later(seen.append, 1)  # its flush is due in the next iteration, which never comes
        loop.stop()

    loop.call_soon(answer_then_stop)
    loop.run_forever()
    loop.close()
    assert seen == []
    assert len(later) == 1

    async def next_loop():
        later(seen.append, 2)
        await asyncio.sleep(0)

    asyncio.run(next_loop())
    assert seen == [1, 2]
