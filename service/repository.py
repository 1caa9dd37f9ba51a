"""Reading the model repository (models/<name>/<version>/, see models/README.md).

Only names that match the repository's naming rule are ever turned into paths, so a request
cannot make the service touch anything outside the repository.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .card import ModelCard

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelLoadError(Exception):
    """A version directory that cannot be served; the message is the reason shown to users."""


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and ".." not in name


@dataclass(frozen=True)
class VersionFiles:
    name: str
    version: int
    path: Path
    card: ModelCard

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def reference_path(self) -> Path:
        return self.path / "reference.onnx"


class VersionPolicy:
    """latest (the highest version), all, or specific:1,3."""

    def __init__(self, text: str) -> None:
        self.text = text.strip()
        self.specific: set[int] | None = None
        if self.text.startswith("specific:"):
            try:
                self.specific = {int(v) for v in self.text.split(":", 1)[1].split(",") if v}
            except ValueError:
                raise ValueError(f"version policy {text!r}: expected specific:1,2,...") from None
        elif self.text not in ("latest", "all"):
            raise ValueError(f"version policy {text!r}: expected latest, all or specific:1,2")

    def select(self, versions: list[int]) -> list[int]:
        if self.specific is not None:
            return sorted(v for v in versions if v in self.specific)
        if self.text == "all":
            return sorted(versions)
        return sorted(versions)[-1:]


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and valid_name(p.name))

    def has_model(self, name: str) -> bool:
        return valid_name(name) and (self.root / name).is_dir()

    def versions(self, name: str) -> list[int]:
        model_dir = self.root / name
        if not valid_name(name) or not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0
        )  # fmt: skip

    def signature(self, name: str) -> tuple:
        """Changes whenever a version appears, disappears or is rewritten (for polling)."""
        entries = []
        for version in self.versions(name):
            card = self.root / name / str(version) / "model.json"
            entries.append((version, card.stat().st_mtime_ns if card.exists() else 0))
        return tuple(entries)

    def read(self, name: str, version: int) -> VersionFiles:
        """The version's card, with every file checked against its recorded sha256."""
        path = self.root / name / str(version)
        try:
            raw = (path / "model.json").read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"model.json is missing or unreadable ({exc.strerror})") from None
        try:
            card = ModelCard.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ModelLoadError(f"model.json is invalid at {where}: {first['msg']}") from None
        if card.name != name or card.version != version:
            raise ModelLoadError(
                f"model.json describes {card.name} v{card.version}; expected {name} v{version}"
            )
        for filename in ("model.onnx", "reference.onnx"):
            record = card.files.get(filename)
            file_path = path / filename
            if not file_path.is_file():
                raise ModelLoadError(f"{filename} is missing")
            if record is not None and _sha256(file_path) != record.sha256:
                raise ModelLoadError(f"{filename} does not match its sha256 in model.json")
        return VersionFiles(name=name, version=version, path=path, card=card)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
