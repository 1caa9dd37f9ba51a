"""The service never imports torch, and never reads the export package: the model repository
is the only contract between them."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_service_module_imports_torch_or_export():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & {"torch", "export"})
        for path in (ROOT / "service").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_export_does_not_import_service():
    offenders = [
        str(p) for p in (ROOT / "export").rglob("*.py") if "service" in imported_modules(p)
    ]
    assert offenders == []


def test_serving_requests_loads_no_torch(demo_repository):
    """Run the app in a fresh interpreter, serve real requests, then inspect sys.modules."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from service.app import create_app
        from service.config import Settings

        repo = Path({str(demo_repository)!r})
        body = (repo / "digits" / "1" / "samples" / "in_distribution.json").read_bytes()
        with TestClient(create_app(Settings(repository=repo))) as client:
            import time
            for _ in range(100):
                if client.get("/v2/health/ready").status_code == 200:
                    break
                time.sleep(0.1)
            assert client.post("/v2/models/digits/infer", content=body).status_code == 200
            drift = client.post("/v2/models/digits/stat-drift", content=body)
            assert drift.status_code in (200, 404), drift.text
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "export"))
        print("IMPORTED", heavy)
        sys.exit(1 if heavy else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
