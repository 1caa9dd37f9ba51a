"""Writing a traffic capture in the documented format (models/README.md, "Traffic captures"),
independently of the service and of export/capture.py, so tests do not depend on either."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_capture(
    capture_dir: Path,
    arrays: dict[str, np.ndarray],
    *,
    model: str = "m",
    version: str = "1",
    capture_id: str = "c1",
    shard_size: int = 50,
    datatype: str = "FP32",
) -> Path:
    """Write `arrays` (input name -> (samples, ...)) as shards + manifest; returns the folder."""
    folder = capture_dir / model / version / capture_id
    folder.mkdir(parents=True)
    total = len(next(iter(arrays.values())))
    shards, size = [], 0
    for index, start in enumerate(range(0, total, shard_size)):
        files = {}
        for name, array in arrays.items():
            files[name] = f"shard-{index:05d}.{name}.npy"
            np.save(folder / files[name], array[start : start + shard_size])
            size += array[start : start + shard_size].nbytes
        shards.append(
            {"index": index, "samples": len(array[start : start + shard_size]), "files": files}
        )
    manifest = {
        "format": "bnserve-capture/1",
        "model": model,
        "version": version,
        "capture_id": capture_id,
        "started": "2026-11-29T10:00:00Z",
        "stopped": "2026-11-29T10:05:00Z",
        "stop_reason": "stopped by admin",
        "samples": total,
        "bytes": size,
        "inputs": [
            {"name": name, "datatype": datatype, "shape": list(array.shape[1:])}
            for name, array in arrays.items()
        ],
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder
