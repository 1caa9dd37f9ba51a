"""parse_infer (ModelInferRequest with its tensors left as views of the received bytes) against
protobuf's own parser as the oracle: the same messages accepted, the same ones refused, the same
fields, and tensor views that alias the wire bytes instead of copying them."""

from __future__ import annotations

import random

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from service.protocol.grpc import bnserve_inference_pb2 as pb
from service.protocol.grpc.codec import decode_infer, parse_infer


def request_bytes(rng: random.Random) -> bytes:
    message = pb.ModelInferRequest(model_name="m" * rng.randint(0, 3), id="i", model_version="1")
    for i in range(rng.randint(0, 3)):
        message.inputs.add(name=f"in{i}", datatype="FP32", shape=[1, 2])
    for _ in range(rng.randint(0, 3)):
        message.raw_input_contents.append(rng.randbytes(rng.randint(0, 300)))
    message.parameters["k"].int64_param = rng.randint(-5, 5)
    message.outputs.add(name="o")
    return message.SerializeToString()


def mangled(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(0, 3)):
        where = rng.randrange(len(out) + 1)
        match rng.randrange(3):
            case 0 if out:
                out[min(where, len(out) - 1)] = rng.randrange(256)
            case 1:
                del out[where:]
            case _:
                out.insert(where, rng.randrange(256))
    return bytes(out)


def oracle(data: bytes) -> pb.ModelInferRequest | None:
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return None


@pytest.mark.parametrize("seed", range(4))
def test_accepts_refuses_and_reads_what_protobuf_does(seed):
    rng = random.Random(seed)
    accepted = refused = 0
    for _ in range(2000):
        data = mangled(request_bytes(rng), rng)
        expected = oracle(data)
        if expected is None:
            with pytest.raises(DecodeError):
                parse_infer(data)
            refused += 1
            continue
        message, raw = parse_infer(data)
        assert [bytes(r) for r in raw] == list(expected.raw_input_contents)
        for field in ("model_name", "model_version", "id", "inputs", "outputs", "parameters"):
            assert getattr(message, field) == getattr(expected, field), field
        accepted += 1
    assert accepted > 100  # both sides of the oracle were exercised
    assert refused > 100


def test_tensors_are_views_of_the_received_bytes():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    data = request.SerializeToString()
    parsed = parse_infer(data)
    assert parsed.model_name == "m"
    assert not parsed.message.raw_input_contents
    assert parsed.raw[0].obj is data  # the wire buffer itself, not a copy
    tensor = decode_infer(parsed).inputs[0]
    assert np.array_equal(np.frombuffer(tensor.raw, np.float32).reshape(x.shape), x)


def test_a_message_of_many_tiny_fields_goes_to_protobuf_whole():
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(5000):
        request.outputs.add(name="o")
    request.raw_input_contents.append(b"\1\2\3\4")
    parsed = parse_infer(request.SerializeToString())
    assert len(parsed.message.outputs) == 5000
    assert [bytes(r) for r in parsed.raw] == [b"\1\2\3\4"]
