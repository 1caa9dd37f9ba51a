"""The peer for benchmarks/load.py: the same ONNX Runtime session (same options as bnserve's)
behind KServe's Python model server, written the way KServe's custom-predictor docs show:
a kserve.Model whose predict() runs the session. Runs in its own virtual environment
(artifacts/kserve-venv), so kserve's pins never touch bnserve's.

    python benchmarks/kserve_peer.py --model models/resnet18/1/model.onnx --port 8090
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import kserve
from kserve import InferOutput, InferRequest, InferResponse

from service.runtime import SessionFactory


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.session = SessionFactory().create(path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        y = self.session.run([self.output_name], {self.input_name: x})[0]
        output = InferOutput(name=self.output_name, shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=True)
        # KServe's response schema requires an id; requests without one get a fresh one.
        response_id = payload.id or uuid.uuid4().hex
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=response_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", default="resnet18")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    server = kserve.ModelServer(
        http_port=args.port, enable_grpc=False, workers=1, enable_latency_logging=False
    )
    server.start([OnnxModel(args.name, args.model)])


if __name__ == "__main__":
    main()
