"""Generate a strict JSON Schema for KServe's InferenceService (serving.kserve.io/v1beta1).

KServe publishes its API as a CRD (1 MB of YAML in the kserve repository) and as the OpenAPI
models of its Python SDK (the `kserve` wheel on PyPI). This script reads the SDK's model files
(`kserve/models/v1beta1_*.py`: `openapi_types`, `attribute_map`, required-field checks) without
importing them, and writes one JSON Schema (draft 2020-12) in which

  * every KServe object allows exactly its declared properties (unknown keys are errors),
  * required fields (e.g. `spec.predictor`) are required,
  * Kubernetes types (V1Container, V1Volume, V1ObjectMeta ...) are `$ref`s into the
    Kubernetes schemas of the `kubernetes-validate` package (`_definitions.json`, strict variant),
    so a predictor's containers are checked as strictly as a Deployment's.

    python -m pip download --no-deps kserve==0.21.0 -d /tmp/kserve
    python deploy/schemas/generate_kserve_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl

tests/test_deploy_manifests.py validates deploy/kserve/*.yaml against the committed output.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "kserve-inferenceservice-v1beta1.json"
K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
SCHEMA_ID = "https://bnserve.invalid/schemas/kserve-inferenceservice-v1beta1.json"
ROOT = "V1beta1InferenceService"

PRIMITIVES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "datetime": {"type": "string"},
    "date": {"type": "string"},
}
# SDK names of Kubernetes types that are not simply V1<Name> in core/v1
K8S_ALIASES = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1Time": "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
    "V1Duration": "io.k8s.apimachinery.pkg.apis.meta.v1.Duration",
    "V1Condition": "io.k8s.apimachinery.pkg.apis.meta.v1.Condition",
    "V1LabelSelector": "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
    # autoscaling targets: an int or a quantity string, the same shape as a Quantity
    "V1beta1MetricQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
}
REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


def read_models(wheel: Path) -> dict[str, dict]:
    """Class name -> {"types": {attr: type}, "names": {attr: json key}, "required": [...]}."""
    models: dict[str, dict] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not re.fullmatch(r"kserve/models/[a-z0-9_]+\.py", name):
                continue
            source = zf.read(name).decode()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.ClassDef):
                    continue
                fields = {}
                for stmt in node.body:
                    if (
                        isinstance(stmt, ast.Assign)
                        and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id in ("openapi_types", "attribute_map")
                    ):
                        fields[stmt.targets[0].id] = ast.literal_eval(stmt.value)
                if "openapi_types" in fields:
                    models[node.name] = {
                        "types": fields["openapi_types"],
                        "names": fields["attribute_map"],
                        "required": sorted(set(REQUIRED.findall(source))),
                    }
    return models


def k8s_name(type_name: str, k8s_defs: dict) -> str | None:
    if type_name in K8S_ALIASES:
        return K8S_ALIASES[type_name]
    m = re.fullmatch(r"K8sIoApi(\w+?)(V\d\w*?)([A-Z]\w*)", type_name)
    if m:
        group, version, kind = m.groups()
        candidate = f"io.k8s.api.{group.lower()}.{version.lower()}.{kind}"
        return candidate if candidate in k8s_defs else None
    m = re.fullmatch(r"(V\d(?:alpha\d|beta\d)?)([A-Z]\w*)", type_name)
    if m:
        version, kind = m.groups()
        suffix = f".{version.lower()}.{kind}"
        matches = sorted(k for k in k8s_defs if k.endswith(suffix))
        core = f"io.k8s.api.core{suffix}"
        return core if core in matches else (matches[0] if len(matches) == 1 else None)
    return None


def build(models: dict[str, dict], k8s_defs: dict) -> tuple[dict, list[str]]:
    defs: dict[str, dict] = {}
    unresolved: list[str] = []

    def schema_for(type_name: str) -> dict:
        type_name = type_name.strip()
        if type_name in PRIMITIVES:
            return dict(PRIMITIVES[type_name])
        m = re.fullmatch(r"list\[(.+)\]", type_name)
        if m:
            return {"type": "array", "items": schema_for(m.group(1))}
        m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
        if m:
            return {"type": "object", "additionalProperties": schema_for(m.group(1))}
        if type_name in models:
            visit(type_name)
            return {"$ref": f"#/$defs/{type_name}"}
        target = k8s_name(type_name, k8s_defs)
        if target:
            return {"$ref": K8S + target}
        unresolved.append(type_name)
        return {}

    def visit(cls: str) -> None:
        if cls in defs:
            return
        defs[cls] = {}  # placeholder against cycles
        model = models[cls]
        props = {model["names"][attr]: schema_for(t) for attr, t in model["types"].items()}
        schema = {"type": "object", "properties": props, "additionalProperties": False}
        required = [model["names"][a] for a in model["required"] if a in model["names"]]
        if required:
            schema["required"] = required
        defs[cls] = schema

    visit(ROOT)
    root = defs[ROOT]
    root["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    root["properties"]["kind"] = {"const": "InferenceService"}
    root["required"] = sorted({*root.get("required", []), "apiVersion", "kind", "spec"})
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "KServe InferenceService serving.kserve.io/v1beta1 (strict)",
        "$ref": f"#/$defs/{ROOT}",
        "$defs": dict(sorted(defs.items())),
    }
    return schema, sorted(set(unresolved))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="kserve-<version>-py3-none-any.whl")
    parser.add_argument("--kubernetes-version", default="1.37.0")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import kubernetes_validate

    k8s_file = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{args.kubernetes_version}-local-strict"
        / "_definitions.json"
    )
    k8s_defs = json.loads(k8s_file.read_text())["$defs"]
    schema, unresolved = build(read_models(args.wheel), k8s_defs)
    version = re.search(r"kserve-([^-]+)-", args.wheel.name)
    schema["description"] = (
        f"Generated by deploy/schemas/{Path(__file__).name} from the kserve "
        f"{version.group(1) if version else '?'} SDK models; Kubernetes types refer to "
        f"kubernetes-validate's v{args.kubernetes_version} strict definitions."
    )
    if unresolved:
        schema["x-unresolved-types"] = unresolved  # accepted as anything
    args.out.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.out} ({len(schema['$defs'])} KServe types; unresolved: {unresolved})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
