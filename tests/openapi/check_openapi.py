"""Checks the gateway's OpenAPI document and real responses against it.

Usage: check_openapi.py DOCUMENT SAMPLES

DOCUMENT is the served OpenAPI 3.1 document. SAMPLES is a JSON list of responses the
gateway actually gave, each {"method", "path" (the template), "status", "content_type",
"body"}. The document must be valid OpenAPI 3.1; every sample's status must be documented
for its operation, its content type must be one the response declares, and a JSON body must
validate against the declared schema. Exits 1 with every failure listed.
"""

import json
import sys

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

BASE = "urn:gateway-openapi"


def absolutise(node):
    """Rewrites local refs (#/components/...) to refs into the registered document."""
    if isinstance(node, dict):
        return {
            k: (BASE + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else absolutise(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [absolutise(v) for v in node]
    return node


def main():
    doc = json.load(open(sys.argv[1]))
    samples = json.load(open(sys.argv[2]))
    validate(doc)  # raises on an invalid OpenAPI 3.1 document
    abs_doc = absolutise(doc)
    registry = Registry().with_resource(BASE, Resource.from_contents(abs_doc, default_specification=DRAFT202012))
    failures = []
    checked = 0
    for s in samples:
        where = f'{s["method"].upper()} {s["path"]} -> {s["status"]}'
        op = abs_doc["paths"].get(s["path"], {}).get(s["method"])
        if op is None:
            failures.append(f"{where}: operation not documented")
            continue
        response = op["responses"].get(str(s["status"]))
        if response is None:
            failures.append(f"{where}: status not documented (documented: {sorted(op['responses'])})")
            continue
        if "$ref" in response:
            name = response["$ref"].rsplit("/", 1)[1]
            response = abs_doc["components"]["responses"][name]
        content = response.get("content", {})
        ctype = (s.get("content_type") or "").split(";")[0].strip()
        if ctype not in content:
            failures.append(f"{where}: content type {ctype!r} not documented ({sorted(content)})")
            continue
        if ctype == "application/json" and s.get("body") is not None:
            validator = Draft202012Validator(content[ctype]["schema"], registry=registry)
            errors = sorted(validator.iter_errors(s["body"]), key=lambda e: list(e.path))
            for e in errors[:3]:
                failures.append(f"{where}: {'/'.join(map(str, e.path))}: {e.message[:300]}")
        checked += 1
    print(f"OpenAPI document valid; {checked} of {len(samples)} responses conform")
    if failures:
        print("\n".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
