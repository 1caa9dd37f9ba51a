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
    lines.append(f"\n  curl -s {url}/metrics | grep bnserve_   # Prometheus metrics")
    lines.append(f"  open {url}/docs                         # OpenAPI")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", default="models")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    print(examples(args.repository, args.url))


if __name__ == "__main__":
    main()
