"""python -m service: serve the model repository with uvicorn.

Flags override BNSERVE_ environment variables, which override defaults.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from .app import create_app
from .config import Settings
from .logs import configure_logging


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a bnserve model repository over KServe v2 (ONNX Runtime).",
    )
    parser.add_argument("--repository", help="model repository folder (BNSERVE_REPOSITORY)")
    parser.add_argument("--host", help="address to bind (BNSERVE_HOST)")
    parser.add_argument("--port", type=int, help="port (BNSERVE_PORT)")
    parser.add_argument("--providers", choices=["auto", "cuda", "cpu"], help="BNSERVE_PROVIDERS")
    parser.add_argument("--version-policy", help="latest | all | specific:1,2")
    parser.add_argument("--poll-interval", type=float, help="seconds; 0 = no polling")
    parser.add_argument("--log-format", choices=["json", "text"])
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    configure_logging(settings.log_format, settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_timeout,
        server_header=False,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
