"""Which model versions are served, and loading, reloading and unloading them.

A (re)load builds the new versions' sessions off the event loop, then swaps the version table
in one assignment: a request sees either the old table or the new one, requests already
running finish on the version they hold, and the replaced versions close after them. A version
that fails to load is UNAVAILABLE with its reason; other models and versions are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import NotFound, Unavailable
from .model import LoadedModel, ServingOptions
from .repository import ModelLoadError, ModelRepository, VersionPolicy, valid_name

log = logging.getLogger("bnserve.registry")


class ModelState(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class VersionState:
    version: int
    state: ModelState
    reason: str = ""
    model: LoadedModel | None = None


@dataclass
class ModelEntry:
    name: str
    reason: str = ""  # why no version is listed (unloaded, none in the repository)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    signature: tuple = ()
    _versions: dict[int, VersionState] = field(default_factory=dict, repr=False)
    _ready: list[int] = field(default_factory=list, repr=False)

    @property
    def versions(self) -> dict[int, VersionState]:
        return self._versions

    @versions.setter
    def versions(self, table: dict[int, VersionState]) -> None:
        # Tables are swapped whole, never edited in place: the READY versions are worked out
        # once per swap, not on each of the three lookups a request makes.
        self._versions = table
        self._ready = sorted(v for v, s in table.items() if s.state == ModelState.READY)

    def ready_versions(self) -> list[int]:
        return list(self._ready)

    @property
    def latest(self) -> LoadedModel | None:
        """The highest READY version, which requests without a version get."""
        return self._versions[self._ready[-1]].model if self._ready else None


LoadHook = Callable[[LoadedModel], None]
StateHook = Callable[[str, int, str], None]


class ModelRegistry:
    def __init__(
        self,
        repository: ModelRepository,
        options: ServingOptions,
        policy: VersionPolicy,
        *,
        on_load: list[LoadHook] | None = None,
        on_state: StateHook | None = None,
    ) -> None:
        self.repository = repository
        self.options = options
        self.policy = policy
        self.on_load = on_load or []
        self.on_state = on_state or (lambda name, version, state: None)
        self._models: dict[str, ModelEntry] = {}

    # -- lookups ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._models)

    def knows(self, name: str) -> bool:
        return name in self._models

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'; expected one of {self.names()}")
        return entry

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The version to serve a request: the given one, or the highest READY version."""
        entry = self.entry(name)
        if version is None or version == "":
            latest = entry.latest
            if latest is None:
                raise Unavailable(
                    f"model '{name}' has no ready version: {self.why_unavailable(entry)}"
                )
            return latest
        # isdigit() alone accepts '²' (int() raises) and '١' (would mean 1): ASCII digits only
        number = int(version) if version.isascii() and version.isdigit() else None
        status = entry.versions.get(number) if number is not None else None
        if status is None:
            listed = [str(v) for v in sorted(entry.versions)]
            raise NotFound(f"model '{name}' has no version '{version}'; expected one of {listed}")
        if status.state != ModelState.READY:
            raise Unavailable(
                f"model '{name}' version {version} is {status.state}: {status.reason}"
            )
        return status.model

    def why_unavailable(self, entry: ModelEntry) -> str:
        reasons = [f"v{v}: {s.reason}" for v, s in sorted(entry.versions.items()) if s.reason]
        return "; ".join(reasons) or entry.reason or "still loading"

    def index(self) -> list[dict]:
        rows = []
        for name in sorted(set(self.repository.model_names()) | set(self._models)):
            entry = self._models.get(name)
            if entry is None:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": "not loaded"})
                continue
            if not entry.versions:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": entry.reason})
            for version, status in sorted(entry.versions.items()):
                rows.append(
                    {
                        "name": name,
                        "version": str(version),
                        "state": status.state.value,
                        "reason": status.reason,
                    }
                )
        return rows

    def loaded_models(self) -> list[LoadedModel]:
        return [
            s.model for e in self._models.values() for s in e.versions.values() if s.model
        ]  # fmt: skip

    # -- changes ----------------------------------------------------------------------------
    async def load_all(self) -> None:
        for name in self.repository.model_names():
            await self.load(name)

    async def load(self, name: str) -> ModelEntry:
        """Load (or reload) a model's versions as the version policy selects them."""
        if not valid_name(name) or not self.repository.has_model(name):
            raise NotFound(f"model '{name}' is not in the repository {self.repository.root}")
        entry = self._models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            signature = self.repository.signature(name)
            wanted = self.policy.select(self.repository.versions(name))
            table: dict[int, VersionState] = {}
            for version in wanted:
                current = entry.versions.get(version)
                if current is not None and current.state == ModelState.READY:
                    table[version] = current  # versions are immutable once written
                    continue
                self.on_state(name, version, ModelState.LOADING)
                table[version] = await asyncio.to_thread(self._load_version, name, version)
            retired = [
                s.model for v, s in entry.versions.items()
                if s.model is not None and table.get(v) is not s
            ]  # fmt: skip
            entry.versions = table  # the atomic swap
            entry.signature = signature
            entry.reason = "" if table else f"no version selected by policy '{self.policy.text}'"
            for model in retired:
                model.retire()
                self.on_state(name, model.version, "RETIRED")
            for version, status in table.items():
                self.on_state(name, version, status.state)
        return entry

    def _load_version(self, name: str, version: int) -> VersionState:
        try:
            files = self.repository.read(name, version)
            model = LoadedModel(files, self.options)
        except ModelLoadError as exc:
            log.warning("model %s v%s is unavailable: %s", name, version, exc)
            return VersionState(version, ModelState.UNAVAILABLE, str(exc))
        for hook in self.on_load:
            hook(model)
        log.info(
            "loaded model %s v%s on %s", name, version, model.provider,
            extra={"model": name, "version": version, "provider": model.provider},
        )  # fmt: skip
        return VersionState(version, ModelState.READY, "", model)

    async def unload(self, name: str) -> None:
        entry = self.entry(name)
        async with entry.lock:
            old, entry.versions = entry.versions, {}
            entry.reason = "unloaded through the repository API"
            entry.signature = ()
            for version, status in old.items():
                if status.model is not None:
                    status.model.retire()
                self.on_state(name, version, "RETIRED")

    async def poll(self) -> list[str]:
        """Reload models whose versions changed on disk; returns the names reloaded."""
        changed = []
        for name in self.repository.model_names():
            entry = self._models.get(name)
            if entry is not None and not entry.versions and entry.reason.startswith("unloaded"):
                continue  # explicitly unloaded: stays so until loaded again
            if entry is None or entry.signature != self.repository.signature(name):
                try:
                    await self.load(name)
                    changed.append(name)
                except NotFound:
                    continue
        return changed

    async def close(self) -> None:
        for entry in self._models.values():
            for status in entry.versions.values():
                if status.model is not None:
                    status.model.retire()
