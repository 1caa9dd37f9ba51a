"""Opt-in, bounded capture of served request inputs (BNSERVE_CAPTURE_DIR), for recalibration.

Capture STORES REQUEST INPUTS on disk. It is off unless BNSERVE_CAPTURE_DIR is set, and then
only runs between an admin's start and stop (or its bounds). Format, a fixed contract read by
`python -m export recalibrate`:

    $BNSERVE_CAPTURE_DIR/<model>/<version>/<capture_id>/
        manifest.json                     rewritten atomically (tmp + rename) after each shard
        shard-00000.<input name>.npy      np.save, no pickle: (samples, *per-sample shape)

The request path only appends a reference to a bounded queue; a writer thread does the disk
work. A full queue (a slow disk) drops the samples and counts them; serving never waits.
"""

from .schemas import CaptureManifest, CaptureStartRequest, CaptureStatus
from .service import CaptureDirError, CaptureService, check_capture_dir
from .writer import Capture

__all__ = [
    "Capture",
    "CaptureDirError",
    "CaptureManifest",
    "CaptureService",
    "CaptureStartRequest",
    "CaptureStatus",
    "check_capture_dir",
]
