"""The drift loop on the digits demo, against a running bnserve, over HTTP only:

  1. accuracy of the served version on the brightened test split (and as trained);
  2. a brightened stream, one image per request, while a capture records it;
  3. live stat-drift flags the BatchNorm layers;
  4. `recalibrate` writes the next version from the capture (no torch involved);
  5. the server loads it; the same kind of stream reads ok in live stat-drift again;
  6. accuracy of the new version, measured the same way.

The server must serve the repository given here, with capture on and every request sampled:

    BNSERVE_CAPTURE_DIR=captures BNSERVE_DRIFT_SAMPLE_RATE=1 BNSERVE_DRIFT_MAX_SAMPLES_PER_S=0 \\
        BNSERVE_DRIFT_MAX_CPU=0 python -m service --repository models
    python -m export.drift_demo --url http://127.0.0.1:8000 --repository models

The stream is the brightened *training* images (no labels are used); accuracy is measured on the
held-out brightened test images. Needs scikit-learn (the digits) and no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .digits import digits_split, shifted
from .errors import ExportError
from .recalibrate import recalibrate

MODEL = "digits"
SHIFT = "brightened"
BATCH = 64
CLIENTS = 4


class DemoError(Exception):
    """The server is not in the state the demo needs; the message says what to do."""


class Client:
    """JSON over HTTP to bnserve, with the admin and debug tokens where given."""

    def __init__(self, url: str, admin_token: str | None, debug_token: str | None) -> None:
        self.url = url.rstrip("/")
        self.admin_token, self.debug_token = admin_token, debug_token

    def call(self, method: str, path: str, body=None, token: str | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise DemoError(f"{method} {path}: HTTP {exc.code} {detail}") from None
        except urllib.error.URLError as exc:
            raise DemoError(f"cannot reach {self.url}: {exc.reason}; is bnserve running?") from None

    def admin(self, method: str, path: str, body=None):
        return self.call(method, path, body, self.admin_token)

    def debug(self, method: str, path: str, body=None):
        return self.call(method, path, body, self.debug_token)

    def infer(self, version: str, images: np.ndarray) -> np.ndarray:
        body = {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(images.shape),
                    "datatype": "FP32",
                    "data": images.reshape(-1).tolist(),
                }
            ]
        }
        answer = self.call("POST", f"/v2/models/{MODEL}/versions/{version}/infer", body)
        logits = answer["outputs"][0]
        return np.asarray(logits["data"], np.float32).reshape(logits["shape"])


def accuracy(client: Client, version: str, images: np.ndarray, labels: np.ndarray) -> float:
    predictions = np.concatenate(
        [
            client.infer(version, images[i : i + BATCH]).argmax(1)
            for i in range(0, len(images), BATCH)
        ]
    )
    return float((predictions == labels).mean())


def stream(client: Client, version: str, images: np.ndarray) -> float:
    """One image per request, CLIENTS at a time, as production traffic arrives; seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda i: client.infer(version, images[i : i + 1]), range(len(images))))
    return time.perf_counter() - started


def live_drift(client: Client, version: str, timeout: float = 30.0) -> dict:
    """The live stat-drift report once the monitor has merged or dropped what was sent."""
    path = f"/v2/models/{MODEL}/versions/{version}/stat-drift/live"
    deadline, last = time.monotonic() + timeout, None
    while True:
        report = client.debug("GET", path)
        monitor = report["monitor"]
        seen = (
            monitor["sampled_requests"],
            monitor["dropped_requests"],
            monitor["pending_samples"],
        )
        settled = monitor["pending_samples"] == 0 and seen == last
        if settled or time.monotonic() > deadline:
            return report
        last = seen
        time.sleep(0.5)


def print_drift(title: str, report: dict) -> None:
    window, summary = report["current"], report["current"]["summary"]
    dropped = report["monitor"]["dropped_requests"]
    print(
        f"\n{title}: live stat-drift of v{report['model_version']} over {window['samples']} "
        f"sampled samples ({dropped} requests dropped by the monitor since load): "
        f"verdict {summary['verdict'].upper()}"
        + (
            f", most drifted {', '.join(summary['most_drifted'])}"
            if summary["most_drifted"]
            else ""
        )
    )
    print(f"  {'layer':<10} {'score':>8} {'noise':>7}  verdict")
    for layer in window["layers"]:
        score = "-" if layer.get("score") is None else f"{layer['score']:.3f}"
        noise = "-" if layer.get("noise_floor") is None else f"{layer['noise_floor']:.3f}"
        print(f"  {layer['name']:<10} {score:>8} {noise:>7}  {layer['verdict']}")


def check_monitor(report: dict) -> None:
    monitor = report["monitor"]
    max_cpu = monitor.get("max_cpu", 0.0)
    if monitor["sample_rate"] < 1.0 or monitor["max_samples_per_s"] != 0 or max_cpu != 0:
        raise DemoError(
            f"the server samples {monitor['sample_rate']:g} of requests (cap "
            f"{monitor['max_samples_per_s']:g}/s, CPU budget {max_cpu:g} of a core); the demo "
            "needs every request sampled: start it with BNSERVE_DRIFT_SAMPLE_RATE=1 "
            "BNSERVE_DRIFT_MAX_SAMPLES_PER_S=0 BNSERVE_DRIFT_MAX_CPU=0"
        )


def wait_ready(client: Client, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.call("GET", f"/v2/models/{MODEL}/versions/{version}/ready")
            return
        except DemoError:
            time.sleep(0.25)
    raise DemoError(f"{MODEL} v{version} did not become ready within {timeout:.0f} s")


def run(args: argparse.Namespace) -> dict:
    client = Client(args.url, args.admin_token, args.debug_token)
    x_train, _y_train, x_test, y_test = digits_split()
    traffic, held_out = shifted(x_train, SHIFT), shifted(x_test, SHIFT)
    metadata = client.call("GET", f"/v2/models/{MODEL}")
    version = str(max(int(v) for v in metadata["versions"]))
    print(f"{MODEL} v{version} is served at {args.url}")

    figures = {
        "before_shifted": accuracy(client, version, held_out, y_test),
        "before_in_distribution": accuracy(client, version, x_test, y_test),
    }
    print(
        f"accuracy of v{version}: {figures['before_shifted']:.4f} on the {SHIFT} test split "
        f"({len(held_out)} images), {figures['before_in_distribution']:.4f} as trained"
    )

    live_drift(client, version)  # the accuracy batches are merged before the window restarts
    client.debug("POST", f"/v2/models/{MODEL}/versions/{version}/stat-drift/live/reset")
    check_monitor(client.debug("GET", f"/v2/models/{MODEL}/versions/{version}/stat-drift/live"))
    status = client.admin(
        "POST",
        f"/v2/repository/models/{MODEL}/capture/start",
        {"version": version, "max_samples": len(traffic)},
    )
    print(
        f"\ncapture {status['capture_id']} started ({status['path']}); streaming "
        f"{len(traffic)} {SHIFT} images, one per request ..."
    )
    seconds = stream(client, version, traffic)
    status = client.admin("POST", f"/v2/repository/models/{MODEL}/capture/stop")
    print(
        f"  {len(traffic)} requests in {seconds:.1f} s; capture stopped ({status['stop_reason']})"
        f" with {status['samples']} samples, {status['bytes']} bytes"
    )
    drift = live_drift(client, version)
    print_drift("before", drift)
    verdicts = {"before": drift["current"]["summary"]["verdict"]}

    capture = Path(status["path"])
    if args.capture_dir is not None:
        capture = args.capture_dir / MODEL / version / status["capture_id"]
    source = args.repository / MODEL / version
    print(f"\npython -m export recalibrate --source {source} --calibration {capture}")
    try:
        report = recalibrate(source, capture, progress=lambda step: print(f"  {step}"))
    except ExportError as exc:
        raise DemoError(f"recalibration failed: {exc}") from None
    new = str(report.version)
    print(
        f"  wrote {report.path} (parity {report.verification.parity_rel_error:.1e} against its "
        f"reference.onnx); per layer, RMS over channels of the mean shift (old std units) and "
        "of the log variance ratio:"
    )
    for layer in report.recalibration.layers:
        print(f"    {layer.name:<10} {layer.mean_shift:7.3f} {layer.log_var_ratio:7.3f}")

    client.admin("POST", f"/v2/repository/models/{MODEL}/load")
    wait_ready(client, new)
    print(f"\nloaded {MODEL} v{new}; streaming {len(held_out)} held-out {SHIFT} images to it ...")
    stream(client, new, held_out)
    drift = live_drift(client, new)
    print_drift("after", drift)
    verdicts["after"] = drift["current"]["summary"]["verdict"]

    figures["after_shifted"] = accuracy(client, new, held_out, y_test)
    figures["after_in_distribution"] = accuracy(client, new, x_test, y_test)
    print(
        f"\n{SHIFT} test split accuracy: v{version} {figures['before_shifted']:.4f} -> "
        f"v{new} {figures['after_shifted']:.4f}"
    )
    print(
        f"as-trained test split accuracy: v{version} {figures['before_in_distribution']:.4f} -> "
        f"v{new} {figures['after_in_distribution']:.4f} (v{new}'s statistics describe the "
        f"{SHIFT} traffic now)"
    )
    return {"versions": [version, new], "live_drift": verdicts, "accuracy": figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.drift_demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="the repository the server serves (the new version is written here)",
    )
    parser.add_argument(
        "--capture-dir",
        type=Path,
        help="the server's BNSERVE_CAPTURE_DIR as seen from here (default: the "
        "path the server reports)",
    )
    parser.add_argument("--admin-token", default=os.environ.get("BNSERVE_ADMIN_TOKEN"))
    parser.add_argument("--debug-token", default=os.environ.get("BNSERVE_DEBUG_TOKEN"))
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"\nresult: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
