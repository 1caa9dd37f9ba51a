"""Print example calls for the models in a repository: python -m service.examples."""

from __future__ import annotations

import argparse

from .repository import ModelLoadError, ModelRepository


def examples(repository: str, url: str) -> str:
    repo = ModelRepository(repository)
    lines = [
        f"bnserve will serve {repository} at {url}. Try:",
        f"  curl -s {url}/v2/health/ready",
        f"  curl -s {url}/v2/models/<name>            # metadata: inputs, outputs, BN layers",
    ]
    for name in repo.model_names():
        versions = repo.versions(name)
        if not versions:
            continue
        try:
            card = repo.read(name, versions[-1]).card
        except ModelLoadError:
            continue
        folder = f"{repository}/{name}/{versions[-1]}"
        lines.append(f"\n  # {name} v{versions[-1]}: {card.description or ''}")
        summary = "python3 -c \"import json,sys; print(json.load(sys.stdin)['summary'])\""
        if card.samples:
            lines.append(
                f"  curl -s -X POST {url}/v2/models/{name}/infer -d @{folder}/{card.samples[0]}"
            )
        for sample in card.samples:
            lines.append(
                f"  curl -s -X POST {url}/v2/models/{name}/stat-drift -d @{folder}/{sample} "
                f"| {summary}"
            )
        lines.append(f"  open {url}/v2/models/{name}/stat-drift/view   # the stat-drift page")
    if "digits" in repo.model_names():
        lines.extend(drift_loop(repository, url))
    lines.append(f"\n  curl -s {url}/metrics | grep bnserve_   # Prometheus metrics")
    lines.append(f"  open {url}/docs                         # OpenAPI")
    return "\n".join(lines)


def drift_loop(repository: str, url: str) -> list[str]:
    """The drift -> capture -> recalibrate -> roll out demo (README, "Recalibrate from captured
    traffic"): it needs capture on and every request sampled, so it names the settings."""
    return [
        "\n  # drift loop: a brightened stream, live drift, capture, recalibrate -> v2, load it,",
        "  # live drift ok again, accuracy before/after. Serve with capture on and every",
        "  # request sampled (capture stores request inputs):",
        "  #   BNSERVE_CAPTURE_DIR=captures BNSERVE_DRIFT_SAMPLE_RATE=1 "
        "BNSERVE_DRIFT_MAX_SAMPLES_PER_S=0 BNSERVE_DRIFT_MAX_CPU=0 make run",
        f"  .venv/bin/python -m export.drift_demo --url {url} --repository {repository} "
        "--capture-dir captures",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", default="models")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    print(examples(args.repository, args.url))


if __name__ == "__main__":
    main()
