"""Deterministic eval mode: the same request gives bitwise the same output every time, and a
sample's output does not depend on the other samples sent with it."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from torch_models import export_small

from service.launcher import ServiceProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("determinism")
    export_small(repo)
    with ServiceProcess(repo) as process:
        yield process


def run(client, x: np.ndarray, binary: bool = True) -> np.ndarray:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return client.infer("small", [tensor]).as_numpy("output")


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def test_same_request_same_bits(client):
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    first = run(client, x)
    for _ in range(15):
        assert run(client, x).tobytes() == first.tobytes()
    assert run(client, x, binary=False).tobytes() == first.tobytes()


def test_sample_output_does_not_depend_on_the_batch(client):
    rng = np.random.default_rng(2)
    batch = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    together = run(client, batch)
    for i in (0, 7, 15):
        alone = run(client, batch[i : i + 1])
        assert alone.tobytes() == together[i : i + 1].tobytes()
    others = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    others[5] = batch[3]
    assert run(client, others)[5].tobytes() == together[3].tobytes()


def test_digits_in_distribution_and_shifted_batches_are_independent(digits_server, digits_samples):
    c = triton.InferenceServerClient(digits_server.url.removeprefix("http://"))
    x, shifted = digits_samples["in_distribution"], digits_samples["inverted"]
    mixed = np.concatenate([x[:4], shifted[:4]])

    def logits(a):
        tensor = triton.InferInput("images", list(a.shape), "FP32")
        tensor.set_data_from_numpy(a)
        return c.infer("digits", [tensor]).as_numpy("logits")

    assert logits(mixed)[:4].tobytes() == logits(x)[:4].tobytes()
    c.close()
