"""Regenerate bnserve_inference_pb2.py(i) from proto/bnserve_inference.proto (grpcio-tools).

The generated module is committed: the service image then needs only grpcio and protobuf at
run time, not the compiler, and a test checks that the committed module matches the .proto.
Run: python -m service.protocol.grpc.generate [--check]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "proto" / "bnserve_inference.proto"
OUTPUTS = ("bnserve_inference_pb2.py", "bnserve_inference_pb2.pyi")


def generate(into: Path) -> None:
    from grpc_tools import protoc

    status = protoc.main(
        ["protoc", f"-I{PROTO.parent}", f"--python_out={into}", f"--pyi_out={into}", str(PROTO)]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, exit 1 if stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in OUTPUTS if (Path(tmp) / n).read_bytes() != _read(HERE / n)]
        if args.check:
            for name in stale:
                print(f"{name} does not match {PROTO.name}; run python -m {__spec__.name}")
            return 1 if stale else 0
        for name in OUTPUTS:
            (HERE / name).write_bytes((Path(tmp) / name).read_bytes())
    return 0


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


if __name__ == "__main__":
    sys.exit(main())
