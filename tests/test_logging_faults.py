"""Logging never blocks serving: a real server whose stderr is a pipe nobody reads keeps
answering requests and health checks, counts the log records it drops, and still stops on
SIGTERM within its grace period. Plus the queueing handler on its own."""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest

from service import logs
from service.launcher import ROOT, free_port
from service.metrics import Metrics

REQUESTS = 10_000
DRAIN_DELAY, GRACEFUL = 0.5, 5.0


def _record(message: str, *args) -> logging.LogRecord:
    return logging.LogRecord("bnserve.test", logging.INFO, __file__, 1, message, args, None)


def test_full_queue_drops_and_counts_then_close_flushes_what_was_queued():
    written: list[bytes] = []
    dropped = logs.DropCounter()
    writer = logs.LogWriter(logs.JsonFormatter(), written.append, capacity=10, dropped=dropped)
    token = logs.request_id.set("req-42")
    try:
        for i in range(15):  # the writer is not started yet: nothing drains the queue
            writer.handler.handle(_record("record %d", i))
    finally:
        logs.request_id.reset(token)
    assert dropped.value == 5
    writer.start()
    assert writer.close(timeout=5.0)
    lines = [orjson.loads(line) for line in b"".join(written).splitlines()]
    assert [line["message"] for line in lines] == [f"record {i}" for i in range(10)]
    # The request id is the one current when the record was made, not on the writer thread.
    assert {line["request_id"] for line in lines} == {"req-42"}


def test_stalled_sink_neither_blocks_logging_nor_close():
    """A pipe nobody reads: the writer blocks in write(); callers and close() must not."""
    read_end, write_end = os.pipe()
    dropped = logs.DropCounter()
    writer = logs.LogWriter(
        logs.JsonFormatter(), logs.fd_sink(write_end), capacity=100, dropped=dropped
    ).start()
    try:
        started = time.monotonic()
        # 2 kB records: one queue-full (100) is already far past the 64 KiB pipe buffer, so
        # the writer blocks in write() however few times it woke while these were made.
        for i in range(20_000):
            writer.handler.handle(_record("padding %s %d", "x" * 2000, i))
        assert time.monotonic() - started < 10.0
        assert dropped.value > 10_000
        started = time.monotonic()
        assert writer.close(timeout=0.5) is False  # could not flush: says so, in time
        assert time.monotonic() - started < 2.0
    finally:
        os.close(read_end)  # the blocked write() now fails with EPIPE and the thread ends
        os.close(write_end)


def test_broken_sink_counts_instead_of_killing_the_writer():
    dropped = logs.DropCounter()

    def broken(_data: bytes) -> None:
        raise BrokenPipeError("reader went away")

    writer = logs.LogWriter(logs.TextFormatter(), broken, dropped=dropped).start()
    for i in range(3):
        writer.handler.handle(_record("lost %d", i))
    assert writer.close(timeout=5.0)
    assert dropped.value == 3


def test_dropped_records_metric_reads_the_process_counter():
    from prometheus_client import generate_latest

    before = logs.dropped_records()
    logs.DROPPED.add(2)
    text = generate_latest(Metrics().registry).decode()
    assert f"bnserve_log_records_dropped_total {float(before + 2)}" in text


def _get(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def test_server_with_unread_stderr_pipe_keeps_serving_and_stops_on_sigterm(demo_repository):
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        BNSERVE_DRAIN_DELAY=str(DRAIN_DELAY),
        BNSERVE_GRACEFUL_TIMEOUT=str(GRACEFUL),
        BNSERVE_LOG_QUEUE_SIZE="1000",
    )
    command = [
        sys.executable, "-m", "service", "--repository", str(demo_repository),
        "--host", "127.0.0.1", "--port", str(port), "--log-format", "json",
    ]  # fmt: skip
    # stderr is a pipe this test never reads: after 64 KiB of logs every write() would block.
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "service exited early"
            try:
                health = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                if _get(health, "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "service not ready in 60 s"
            time.sleep(0.1)

        sample = next((demo_repository / "digits" / "1" / "samples").glob("*.json"))
        tensor = orjson.loads(sample.read_bytes())["inputs"][0]
        one = {**tensor, "shape": [1, *tensor["shape"][1:]], "data": tensor["data"][:64]}
        body = orjson.dumps({"inputs": [one]})
        headers = {"content-type": "application/json"}
        # Each read blocks at most 10 s: a frozen server fails the test instead of hanging it.
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        started = time.monotonic()
        for i in range(REQUESTS):
            client.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
            response = client.getresponse()
            assert response.status == 200, (i, response.read())
            response.read()
            if i % 1000 == 999:
                assert _get(health, "/v2/health/ready")[0] == 200, i
                assert _get(health, "/v2/health/live")[0] == 200, i
            assert time.monotonic() - started < 240, f"only {i} requests in 240 s"
        client.close()

        status, metrics = _get(health, "/metrics")
        assert status == 200
        dropped = re.search(rb"^bnserve_log_records_dropped_total (\S+)$", metrics, re.M)
        assert dropped is not None
        assert float(dropped[1]) > 0, "the log sink stalled, so records must have been dropped"
        health.close()

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        grace = DRAIN_DELAY + GRACEFUL + logs.FLUSH_TIMEOUT
        assert process.wait(timeout=grace + 10) == 0
        assert time.monotonic() - signalled < grace + 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_writer_thread_is_a_daemon_and_named():
    writer = logs.LogWriter(logs.JsonFormatter(), lambda _data: None).start()
    try:
        thread = next(t for t in threading.enumerate() if t.name == "bnserve-log-writer")
        assert thread.daemon
    finally:
        writer.close()


def test_exceptions_are_formatted_on_the_writer_with_their_traceback():
    written: list[bytes] = []
    writer = logs.LogWriter(logs.JsonFormatter(), written.append)
    try:
        raise ValueError("bad tensor")
    except ValueError:
        record = logging.LogRecord(
            "bnserve.app", logging.ERROR, __file__, 1, "unhandled error", (), sys.exc_info()
        )
    writer.handler.handle(record)
    writer.start()
    assert writer.close(timeout=5.0)
    line = orjson.loads(b"".join(written))
    assert line["message"] == "unhandled error"
    assert "ValueError: bad tensor" in line["exception"]


@pytest.mark.parametrize("code", [200, "INVALID_ARGUMENT"])
def test_access_entries_make_the_record_logging_would_have_made(code):
    """log_access skips LogRecord on the event loop; the writer's line must be the one
    `logger.info(..., extra=...)` through the handler gives, for both formats."""
    made: list[logging.LogRecord] = []
    logger = logging.getLogger("bnserve.access.oracle")
    handler = logs.QueueingHandler(made.append)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    token = logs.request_id.set("req-7")
    try:
        key = "status" if isinstance(code, int) else "grpc_code"
        extra = {key: code, "duration_ms": 0.412, "path": "/v2/models/m/infer", "method": "POST"}
        logger.info("%s %s %s", "POST", "/v2/models/m/infer", code, extra=extra)
        entry = logs.AccessEntry(
            made[0].created, "req-7", "POST", "/v2/models/m/infer", code, 0.412
        )
    finally:
        logs.request_id.reset(token)
        logger.removeHandler(handler)
    oracle = made[0]
    oracle.name = logs.ACCESS_LOGGER
    ours = entry.record()
    json_formatter = logs.JsonFormatter()
    assert orjson.loads(json_formatter.format(ours)) == orjson.loads(json_formatter.format(oracle))
    assert logs.TextFormatter().format(ours) == logs.TextFormatter().format(oracle)
