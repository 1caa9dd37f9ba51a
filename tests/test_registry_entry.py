"""ModelEntry works out its READY versions when its version table is swapped (the registry's
only way of changing it): every lookup after a swap sees the new table, none sees a stale one."""

from __future__ import annotations

from service.registry import ModelEntry, ModelState, VersionState


def test_latest_and_ready_versions_follow_each_table_swap():
    entry = ModelEntry("m")
    assert entry.latest is None
    assert entry.ready_versions() == []
    one, two, three = object(), object(), object()  # stand-ins for LoadedModel
    entry.versions = {
        3: VersionState(3, ModelState.UNAVAILABLE, "broken"),
        1: VersionState(1, ModelState.READY, "", one),
        2: VersionState(2, ModelState.READY, "", two),
    }
    assert entry.ready_versions() == [1, 2]
    assert entry.latest is two
    entry.ready_versions().clear()  # a copy: callers cannot edit the cache
    assert entry.ready_versions() == [1, 2]
    entry.versions = {**entry.versions, 3: VersionState(3, ModelState.READY, "", three)}
    assert entry.latest is three
    entry.versions = {}  # unloaded
    assert entry.latest is None
    assert entry.ready_versions() == []
