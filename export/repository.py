"""Writing one version into the model repository: models/<name>/<version>/.

Everything is written into a hidden staging folder beside the versions and renamed into place at
the end, so a failed or interrupted export leaves no partial version behind and a reader (the
service) never sees half a version. Readers ignore names that are not positive integers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .card import FileRecord, ModelCard
from .errors import ExportError, InvalidInputError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name or "") or ".." in name:
        raise InvalidInputError(
            f"model name {name!r} is not usable; expected letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (it becomes a folder name)"
        )
    return name


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())


def file_record(data: bytes) -> FileRecord:
    return FileRecord(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def write_version(
    repository: str | os.PathLike,
    name: str,
    version: int | None,
    files: dict[str, bytes],
    make_card: Callable[[int], ModelCard],
) -> tuple[int, Path]:
    """Write `files` plus model.json (from make_card(version)) as one new version, atomically."""
    validate_name(name)
    if version is not None and (not isinstance(version, int) or version < 1):
        raise InvalidInputError(f"version {version!r} is not usable; expected a positive integer")
    model_dir = Path(repository) / name
    if version is not None and (model_dir / str(version)).exists():
        raise _version_exists(name, version, model_dir)
    created_model_dir = not model_dir.exists()
    staging = model_dir / f".staging-{uuid.uuid4().hex}"
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        for relative, data in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            _write(target, data)
        while True:
            chosen = (
                version if version is not None else max(existing_versions(model_dir), default=0) + 1
            )
            card = make_card(chosen)
            _write(staging / "model.json", (card.model_dump_json(indent=2) + "\n").encode())
            final = model_dir / str(chosen)
            try:
                os.rename(staging, final)  # atomic; fails if the version appeared meanwhile
            except OSError as exc:
                if not final.exists():
                    raise
                if version is not None:
                    raise _version_exists(name, version, model_dir) from exc
                continue  # a concurrent export took this number: take the next
            _fsync_dir(model_dir)
            return chosen, final
    except InvalidInputError:
        raise
    except OSError as exc:
        raise ExportError(
            f"cannot write to the model repository {repository}: {exc.strerror or exc}; "
            "expected a writable folder with free space"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_model_dir:
            with contextlib.suppress(OSError):
                model_dir.rmdir()  # only succeeds if nothing was written


def _version_exists(name: str, version: int, model_dir: Path) -> InvalidInputError:
    return InvalidInputError(
        f"version {version} of model {name!r} already exists in {model_dir}; "
        "expected a new version number (or none, for the next free one)"
    )


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
