"""Container health check: exit 0 when GET /v2/health/ready answers 200, else 1.

Reads the same BNSERVE_PORT as the service; probes 127.0.0.1 inside the container (the service may
bind 0.0.0.0 or 127.0.0.1). Standard library only, so it adds nothing to the image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("BNSERVE_PORT", "8000")
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    timeout = float(os.environ.get("BNSERVE_HEALTHCHECK_TIMEOUT", "4"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url}: HTTP {response.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
