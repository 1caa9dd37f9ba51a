"""benchmarks.phases against a real served process: its probes sit on the path a request really
takes (every phase non-negative, in order) and the phases add up to what the client measured,
request by request. A rename or reordering in the service fails here, not silently in a table."""

from __future__ import annotations

import math

from benchmarks.phases import PHASES, measure


def test_phases_follow_the_request_and_add_up_to_the_client_time(demo_repository):
    report = measure("digits", demo_repository, rounds=1, count=40)

    assert list(report.phases) == [label for label, _, _ in PHASES]
    assert [len(report.total), len(report.unprobed), len(report.raw)] == [40, 40, 40]
    assert all(after >= 0 for after in report.after)
    for index, total in enumerate(report.total):
        parts = [values[index] for values in report.phases.values()]
        assert min(parts) >= 0, dict(zip(report.phases, parts, strict=True))
        assert math.isclose(sum(parts), total, rel_tol=1e-9, abs_tol=1e-9)
    # The model really ran inside the traced window, and raw runs are its own cost.
    assert min(report.phases["session.run"]) > 0
    assert all(raw > 0 for raw in report.raw)
