"""Reading a traffic capture (format `bnserve-capture/1`, written by the service) for recalibration.

    <capture_dir>/<model>/<version>/<capture_id>/
      manifest.json                       CaptureManifest below
      shard-00000.<input name>.npy        np.save array (samples in shard, *per-sample shape)

`read_capture` accepts the capture_id folder itself, or any folder above it that holds exactly
one capture (e.g. <capture_dir>/<model>/<version>/ after a single capture). Every array is
loaded with allow_pickle=False and checked against the manifest; nothing is trusted by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .card import TensorSpec
from .errors import InvalidInputError

CAPTURE_FORMAT = "bnserve-capture/1"
MANIFEST = "manifest.json"
SEARCH_DEPTH = 3  # <capture_dir>/<model>/<version>/<capture_id>

NUMPY_DATATYPES = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}


class CaptureInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    datatype: str = Field(description="KServe v2 datatype, e.g. FP32")
    shape: list[int] = Field(description="per-sample shape, without the batch axis")


class CaptureShard(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int = Field(ge=0)
    samples: int = Field(ge=0)
    files: dict[str, str] = Field(description="input name -> .npy file beside the manifest")


class CaptureManifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: str = Field(pattern=r"^bnserve-capture/1$")
    model: str
    version: str
    capture_id: str = Field(min_length=1)
    started: str
    stopped: str | None = None
    stop_reason: str | None = None
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    inputs: list[CaptureInput] = Field(min_length=1)
    shards: list[CaptureShard]


@dataclass
class Capture:
    """A validated capture: its manifest and one array per input holding every sample."""

    path: Path
    manifest: CaptureManifest
    arrays: dict[str, np.ndarray]

    @property
    def samples(self) -> int:
        return self.manifest.samples

    def inputs_for(self, specs: list[TensorSpec]) -> list[np.ndarray]:
        """The arrays in the model's input order, after checking names, datatypes and shapes."""
        where = f"capture {self.manifest.capture_id}"
        captured = {i.name: i for i in self.manifest.inputs}
        if sorted(captured) != sorted(s.name for s in specs):
            raise InvalidInputError(
                f"{where} has input(s) {sorted(captured)}; expected the model's inputs "
                f"{[s.name for s in specs]}"
            )
        arrays = []
        for spec in specs:
            got = captured[spec.name]
            expected_shape = spec.shape[1:]
            fits = len(got.shape) == len(expected_shape) and all(
                e in (-1, g) for g, e in zip(got.shape, expected_shape, strict=True)
            )
            if got.datatype != spec.datatype or not fits:
                raise InvalidInputError(
                    f"{where} input '{spec.name}' is {got.datatype} {got.shape} per sample; "
                    f"expected {spec.datatype} {expected_shape} (-1: any size) as the model "
                    "takes it"
                )
            arrays.append(self.arrays[spec.name])
        return arrays


def find_capture(path: Path) -> Path:
    """The capture folder: `path` if it holds manifest.json, else its only capture below."""
    if not path.is_dir():
        raise InvalidInputError(
            f"calibration capture {path} is not a folder; expected a capture folder holding "
            f"{MANIFEST} (<capture_dir>/<model>/<version>/<capture_id>)"
        )
    if (path / MANIFEST).exists():
        return path
    found = sorted(
        p.parent
        for depth in range(1, SEARCH_DEPTH + 1)
        for p in path.glob("/".join(["*"] * depth) + "/" + MANIFEST)
    )
    if len(found) != 1:
        listing = f" ({', '.join(str(p.relative_to(path)) for p in found[:5])})" if found else ""
        raise InvalidInputError(
            f"{path} holds no {MANIFEST} and {len(found)} captures below it{listing}; expected "
            "a capture folder <capture_dir>/<model>/<version>/<capture_id> holding manifest.json"
        )
    return found[0]


def read_capture(path: str | Path) -> Capture:
    """Load and validate a capture; raises InvalidInputError naming what is wrong."""
    folder = find_capture(Path(path))
    manifest = _read_manifest(folder / MANIFEST)
    where = f"capture {folder}"
    if manifest.samples != sum(s.samples for s in manifest.shards):
        raise InvalidInputError(
            f"{where}: manifest says {manifest.samples} samples but its shards hold "
            f"{sum(s.samples for s in manifest.shards)}; expected the shard counts to add up"
        )
    if manifest.samples == 0:
        raise InvalidInputError(f"{where} holds no samples; expected a capture of real traffic")
    parts: dict[str, list[np.ndarray]] = {i.name: [] for i in manifest.inputs}
    for shard in manifest.shards:
        if sorted(shard.files) != sorted(parts):
            raise InvalidInputError(
                f"{where}: shard {shard.index} has files for {sorted(shard.files)}; expected one "
                f"per input {sorted(parts)}"
            )
        for spec in manifest.inputs:
            parts[spec.name].append(_read_shard(folder, shard, spec))
    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    return Capture(path=folder, manifest=manifest, arrays=arrays)


def _read_manifest(path: Path) -> CaptureManifest:
    try:
        return CaptureManifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read capture manifest {path}: {exc.strerror}; expected a readable {MANIFEST}"
        ) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise InvalidInputError(
            f"capture manifest {path} is malformed at {field}: {first['msg']}; expected a "
            f"{CAPTURE_FORMAT} manifest (see models/README.md)"
        ) from exc


def _read_shard(folder: Path, shard: CaptureShard, spec: CaptureInput) -> np.ndarray:
    relative = shard.files[spec.name]
    target = (folder / relative).resolve()
    if target.parent != folder.resolve():  # a manifest names files beside it, never elsewhere
        raise InvalidInputError(
            f"capture {folder}: shard file {relative!r} is not beside the manifest; expected a "
            "plain file name"
        )
    try:
        array = np.load(target, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read capture shard {target}: {' '.join(str(exc).split())[:200]}; expected "
            "an .npy array written by np.save"
        ) from exc
    dtype = NUMPY_DATATYPES.get(spec.datatype)
    expected = (shard.samples, *spec.shape)
    if dtype is None or array.dtype != dtype or array.shape != expected:
        raise InvalidInputError(
            f"capture shard {target} holds {array.dtype} {array.shape}; expected "
            f"{spec.datatype} {expected} as the manifest declares"
        )
    return array
