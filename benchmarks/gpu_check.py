"""One prepared check of CUDA serving, for a machine with an NVIDIA GPU, from a fresh checkout:

    python3 benchmarks/gpu_check.py          # < 8 min: installs, tests, checks, benchmarks
    python3 benchmarks/gpu_check.py --cpu    # the same checks on the CPU EP (no GPU needed)

Steps: (1) fail fast without an NVIDIA GPU (nvidia-smi lists none); (2) install what it needs
into .venv (the service, `onnxruntime-gpu[cuda,cudnn]`, whose extras bring CUDA 13 and cuDNN 9
as pip's nvidia-* wheels, which service/runtime.py preloads, plus pytest, httpx and
tritonclient; no torch: every model here is built with onnx.helper); (3) run tests/test_gpu.py,
where no test may skip; (4) on a ResNet-18-shaped CNN folded by export.fold_onnx: the session
really runs on the CUDA EP (`get_providers()`), with the service's deterministic settings
(service.runtime.SessionFactory: cudnn_conv_algo_search DEFAULT, no TF32), repeats bitwise,
agrees across batch sizes, agrees with the CPU EP, and the server's output is bitwise the raw
session's; (5) the serving benchmark: raw session.run vs HTTP binary vs gRPC (when this
checkout's `python -m service` has --grpc-port and tritonclient.grpc imports), batch 1 and 8,
blocks taking turns. Prints a table and a verdict; the exit status is 0 only if every check
passed (2: no GPU, 3: setup failed).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
GPU_PACKAGES = ["onnxruntime-gpu[cuda,cudnn]>=1.31,<1.32"]
TEST_PACKAGES = ["pytest>=8", "pytest-timeout>=2.3", "httpx>=0.27", "tritonclient[http]>=2.50"]
RTOL_CPU = 1e-4  # CUDA vs CPU EP: different kernels, same float32 model
RTOL_BATCH = 1e-5  # one sample alone vs in a batch of 8 (cuDNN may pick other algorithms)


def fail(code: int, message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(code)


def gpu_present() -> str | None:
    """Why no NVIDIA GPU is usable here, or None. Standard library only: runs before setup."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi not found: no NVIDIA driver on this machine"
    try:
        listed = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed ({exc})"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU ({(listed.stderr or listed.stdout).strip()[:200]})"
    print(listed.stdout.strip())
    return None


def setup(cpu: bool, venv: Path = VENV) -> Path:
    """The interpreter to run the checks with: the venv, made or completed as needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    probe = "import onnxruntime, pytest, httpx, tritonclient.http, service"
    have = subprocess.run(
        [str(python), "-c", probe], cwd=ROOT, capture_output=True, check=False
    ).returncode
    if have != 0:
        subprocess.run([*pip, "-e", str(ROOT), *TEST_PACKAGES], check=True)
    if not cpu:  # CUDA 13 + cuDNN 9 from pip's nvidia-* wheels (onnxruntime-gpu's extras)
        subprocess.run([*pip, *GPU_PACKAGES], check=True)
    if grpc_flag(python):
        subprocess.run([*pip, "tritonclient[grpc]>=2.50"], check=True)
    return python


def grpc_flag(python: Path | str = sys.executable) -> bool:
    """Whether this checkout's service has a gRPC server (`--grpc-port`)."""
    shown = subprocess.run(
        [str(python), "-m", "service", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return "--grpc-port" in shown.stdout


# ---- everything below runs inside the venv ---------------------------------------------------


def resnet18_onnx(size: int, seed: int = 0):
    """A ResNet-18-shaped CNN (11.7 M parameters) with BatchNorm after every conv, built with
    onnx.helper so no torch is needed; BN statistics are non-trivial so folding matters."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, ids = [], [], itertools.count()

    def tensor(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv_bn(x: str, cin: int, cout: int, k: int, *, stride: int, relu: bool) -> str:
        i = next(ids)
        w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        nodes.append(
            helper.make_node(
                "Conv", [x, tensor(f"conv{i}.w", w)], [f"c{i}"],
                pads=[k // 2] * 4, strides=[stride] * 2,
            )
        )  # fmt: skip
        bn = [
            tensor(f"bn{i}.weight", rng.uniform(0.5, 1.5, cout)),
            tensor(f"bn{i}.bias", rng.uniform(-0.2, 0.2, cout)),
            tensor(f"bn{i}.running_mean", rng.uniform(-0.2, 0.2, cout)),
            tensor(f"bn{i}.running_var", rng.uniform(0.5, 2.0, cout)),
        ]
        nodes.append(
            helper.make_node("BatchNormalization", [f"c{i}", *bn], [f"b{i}"], name=f"bn{i}")
        )
        if not relu:
            return f"b{i}"
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"]))
        return f"r{i}"

    x = conv_bn("x", 3, 64, 7, stride=2, relu=True)
    nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        )
    )
    x, cin = "pool", 64
    for stage, width in enumerate([64, 128, 256, 512]):
        for block in range(2):
            stride = 2 if stage and not block else 1
            y = conv_bn(x, cin, width, 3, stride=stride, relu=True)
            y = conv_bn(y, width, width, 3, stride=1, relu=False)
            identity = (
                x
                if stride == 1 and cin == width
                else conv_bn(x, cin, width, 1, stride=stride, relu=False)
            )
            out = f"s{stage}b{block}"
            nodes.append(helper.make_node("Add", [y, identity], [out + "_sum"]))
            nodes.append(helper.make_node("Relu", [out + "_sum"], [out]))
            x, cin = out, width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    fc_w = tensor("fc.w", rng.standard_normal((512, 1000)) / np.sqrt(512))
    nodes.append(
        helper.make_node("Gemm", ["flat", fc_w, tensor("fc.b", np.zeros(1000))], ["output"])
    )
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1000])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, bool(ok), detail))
        print(
            f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True
        )
        return ok

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.rows)


def rel(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def run_gpu_tests(checks: Checks, cpu: bool) -> None:
    if cpu:
        checks.add("tests/test_gpu.py", True, "not run in --cpu mode (its tests need CUDA)")
        return
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-rs", "-s",
         "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    print(result.stdout[-3000:])
    checks.add(
        "tests/test_gpu.py (no skips)",
        result.returncode == 0 and "skipped" not in summary and "passed" in summary,
        summary,
    )


def session_checks(checks: Checks, model_file: Path, ep: str, size: int):
    import numpy as np

    from service.runtime import CPU, CUDA, SessionFactory

    factory = SessionFactory("cuda" if ep == CUDA else "cpu")
    session = factory.create(model_file)
    providers = session.get_providers()
    checks.add(f"session runs on {ep}", providers[0] == ep, f"get_providers() = {providers}")
    if ep == CUDA:
        options = session.get_provider_options()[CUDA]
        checks.add(
            "deterministic CUDA options",
            options.get("cudnn_conv_algo_search") == "DEFAULT" and options.get("use_tf32") == "0",
            f"cudnn_conv_algo_search={options.get('cudnn_conv_algo_search')}, "
            f"use_tf32={options.get('use_tf32')}",
        )
    x = np.random.default_rng(7).standard_normal((8, 3, size, size)).astype(np.float32)
    first = session.run(None, {"x": x})[0]
    repeats = [session.run(None, {"x": x})[0].tobytes() == first.tobytes() for _ in range(20)]
    checks.add("bitwise repeatability (20 runs, batch 8)", all(repeats), f"{sum(repeats)}/20 equal")
    alone = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(8)])
    diff = rel(alone, first)
    checks.add(
        "batch independence (each sample alone vs in batch 8)",
        diff <= RTOL_BATCH,
        f"max rel diff {diff:.2e}, bitwise {'equal' if alone.tobytes() == first.tobytes() else 'not equal'}",
    )
    cpu = SessionFactory("cpu").create(model_file)
    on_cpu = cpu.run(None, {"x": x})[0]
    diff = rel(first, on_cpu)
    checks.add(
        f"parity with the CPU EP (rtol {RTOL_CPU:g})", diff <= RTOL_CPU, f"max rel diff {diff:.2e}"
    )
    assert cpu.get_providers() == [CPU]
    return session


def percentile_ms(samples: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.array(samples) * 1000, q))


def serving_benchmark(checks: Checks, repository: Path, session, ep: str, args):
    size, iterations, rounds = args.size, args.iterations, args.rounds
    batches = [int(b) for b in args.batches.split(",")]
    import http.client

    import numpy as np
    import orjson

    from service.launcher import ServiceProcess, free_port

    grpc = grpc_flag()
    if grpc:
        try:
            import tritonclient.grpc as triton_grpc
        except ImportError:
            grpc = False
    args, grpc_port = [], None
    if grpc:
        grpc_port = free_port()
        args = ["--grpc-port", str(grpc_port)]
    provider = "cuda" if ep.startswith("CUDA") else "cpu"
    env = {"BNSERVE_PROVIDERS": provider, "BNSERVE_LOG_LEVEL": "warning"}
    results: dict[tuple[int, str], list[float]] = {}
    with ServiceProcess(repository, *args, env=env) as server:
        meta = orjson.loads(urlopen(f"{server.url}/v2/models/resnet18"))
        served_ep = meta.get("parameters", {}).get("execution_provider")
        checks.add(f"server reports {ep}", served_ep == ep, f"execution_provider = {served_ep}")
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") if grpc else None
        for batch in batches:
            x = (
                np.random.default_rng(batch)
                .standard_normal((batch, 3, size, size))
                .astype(np.float32)
            )
            header = orjson.dumps(
                {
                    "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                "parameters": {"binary_data_size": x.nbytes}}],
                    "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
                }
            )  # fmt: skip
            body, headers = (
                header + x.tobytes(),
                {"inference-header-content-length": str(len(header))},
            )

            def http_binary(body=body, headers=headers) -> bytes:
                connection.request("POST", "/v2/models/resnet18/infer", body=body, headers=headers)
                response = connection.getresponse()
                content = response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {content[:300]!r}")
                size_ = int(response.getheader("inference-header-content-length"))
                return content[size_:]

            calls = {
                "raw session.run": lambda x=x: session.run(None, {"x": x})[0],
                "HTTP binary": http_binary,
            }
            if grpc_client is not None:
                tensor = triton_grpc.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                out = triton_grpc.InferRequestedOutput("output")
                calls["gRPC"] = lambda t=tensor, o=out: grpc_client.infer(
                    "resnet18", [t], outputs=[o]
                ).as_numpy("output")
            raw = session.run(None, {"x": x})[0]
            checks.add(
                f"served output is bitwise the raw session's (HTTP, batch {batch})",
                http_binary() == raw.tobytes(),
            )
            if "gRPC" in calls:
                checks.add(
                    f"served output is bitwise the raw session's (gRPC, batch {batch})",
                    calls["gRPC"]().tobytes() == raw.tobytes(),
                )
            for call in calls.values():
                for _ in range(3):
                    call()
            count = max(5, iterations // batch)
            for _ in range(rounds):
                for way, call in calls.items():
                    samples = results.setdefault((batch, way), [])
                    for _ in range(count):
                        started = time.perf_counter()
                        call()
                        samples.append(time.perf_counter() - started)
        connection.close()
    return results, grpc


def urlopen(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def print_table(results, ep: str, size: int, grpc: bool) -> None:
    print(f"\nResNet-18-shaped CNN, {size}x{size}, {ep}" + ("" if grpc else " (no gRPC column: "
          "this checkout's service has no --grpc-port or tritonclient.grpc is missing)"))  # fmt: skip
    print(f"{'batch':>5} | {'way':<16} | {'p50 ms':>8} | {'p99 ms':>8} | {'p50 / raw':>9} | n")
    print("-" * 64)
    for (batch, way), samples in results.items():
        raw = statistics.median(results[(batch, "raw session.run")])
        print(
            f"{batch:>5} | {way:<16} | {percentile_ms(samples, 50):8.2f} | "
            f"{percentile_ms(samples, 99):8.2f} | {statistics.median(samples) / raw:9.3f} | {len(samples)}"
        )


def checks_in_venv(args) -> int:
    sys.path.insert(0, str(ROOT))
    from export import fold_onnx
    from service.runtime import CPU, CUDA, cuda_unusable_reason

    checks = Checks()
    ep = CPU if args.cpu else CUDA
    if not args.cpu:
        reason = cuda_unusable_reason()
        if not checks.add(
            "CUDA EP can run (driver, device, CUDA 13 + cuDNN 9)", reason is None, reason or ""
        ):
            print("gpu_check: FAILED: the CUDA execution provider cannot run here", file=sys.stderr)
            return 1
    run_gpu_tests(checks, args.cpu)
    with tempfile.TemporaryDirectory(prefix="bnserve-gpu-check-") as folder:
        repository = Path(folder)
        started = time.perf_counter()
        fold_onnx(resnet18_onnx(args.size), repository=repository, name="resnet18", version=1)
        print(f"  exported the ResNet-18-shaped CNN in {time.perf_counter() - started:.1f} s")
        session = session_checks(
            checks, repository / "resnet18" / "1" / "model.onnx", ep, args.size
        )
        results, grpc = serving_benchmark(checks, repository, session, ep, args)
    print_table(results, ep, args.size, grpc)
    failed = [name for name, ok, _ in checks.rows if not ok]
    print(f"\ngpu_check: {'PASSED' if not failed else 'FAILED: ' + '; '.join(failed)}")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU EP")
    parser.add_argument("--no-install", action="store_true", help="use this interpreter as is")
    parser.add_argument("--venv", type=Path, default=VENV, help="where to install (.venv)")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--iterations", type=int, default=100, help="calls per block at batch 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_venv or args.no_install:
        return checks_in_venv(args)
    if not args.cpu:
        reason = gpu_present()
        if reason is not None:
            fail(2, f"no NVIDIA GPU: {reason}. Use --cpu to run the same checks on the CPU EP.")
    started = time.perf_counter()
    try:
        python = setup(args.cpu, args.venv)
    except (OSError, subprocess.CalledProcessError) as exc:
        fail(3, f"setup failed: {exc}")
    print(f"gpu_check: environment ready in {time.perf_counter() - started:.0f} s", flush=True)
    rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-install"]
    return subprocess.run(
        [str(python), str(Path(__file__).resolve()), "--in-venv", *rest], cwd=ROOT, check=False
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
