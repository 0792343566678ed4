#!/usr/bin/env python3
"""Validate FHIR R4 JSON resources against the fhir.resources R4B models.

Usage:
    scripts/fhir_check.py FILE...          # each file: one JSON resource, a JSON array, or NDJSON
    some-command | scripts/fhir_check.py   # same formats on stdin
    scripts/fhir_check.py -                # explicit stdin

Each resource is validated with the model class matching its resourceType
(AuditEvent, Bundle, OperationOutcome, CapabilityStatement explicitly; any other
R4B resource type through fhir.resources' own lookup). Every entry.resource of a
Bundle is also checked on its own, so an error names the entry it is in.

Exit status: 0 if every resource is valid, 1 if any is not (a per-resource error
list is printed on stderr), 2 on usage errors (no input, unreadable file).

Requires (see scripts/requirements-test.txt):
    fhir.resources==8.3.0   # tested: 8.3.0 (with fhir-core 1.1.12, pydantic 2.13.4);
                            # R4B models live in fhir.resources.R4B (the top-level
                            # package is R5 since 7.0, so do not import from it).
R4B's AuditEvent is structurally identical to R4's, which is what IHE BALP profiles.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterator

try:
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.auditevent import AuditEvent
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement
    from fhir.resources.R4B.operationoutcome import OperationOutcome
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(
        f"fhir_check: cannot import fhir.resources R4B models ({exc}).\n"
        "Install them with: pip install -r scripts/requirements-test.txt\n"
    )
    sys.exit(2)

MODELS = {
    "AuditEvent": AuditEvent,
    "Bundle": Bundle,
    "OperationOutcome": OperationOutcome,
    "CapabilityStatement": CapabilityStatement,
}


def model_for(resource_type: str):
    model = MODELS.get(resource_type)
    if model is not None:
        return model
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, LookupError, AttributeError, ImportError):
        return None


def format_validation_error(exc: Exception) -> list[str]:
    """Turn a pydantic ValidationError (or anything else) into readable lines."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            lines = []
            for err in errors():
                loc = ".".join(str(p) for p in err.get("loc", ())) or "(resource)"
                lines.append(f"{loc}: {err.get('msg', '')} [{err.get('type', '')}]")
            if lines:
                return lines
        except Exception:  # fall back to str() below
            pass
    return [f"{type(exc).__name__}: {exc}".strip()]


def check_resource(doc: Any, where: str, problems: list[tuple[str, list[str]]]) -> int:
    """Validate one resource (and a Bundle's entries). Returns resources checked."""
    if not isinstance(doc, dict):
        problems.append((where, [f"not a JSON object (got {type(doc).__name__})"]))
        return 1
    rtype = doc.get("resourceType")
    rid = doc.get("id")
    label = f"{where} {rtype or '?'}" + (f"/{rid}" if isinstance(rid, str) else "")
    if not isinstance(rtype, str) or not rtype:
        problems.append((label, ["missing or non-string resourceType"]))
        return 1
    model = model_for(rtype)
    if model is None:
        problems.append((label, [f"unknown FHIR R4B resourceType {rtype!r}"]))
        return 1
    checked = 1
    try:
        model.model_validate(doc)
    except Exception as exc:  # pydantic.ValidationError and friends
        problems.append((label, format_validation_error(exc)))
    if rtype == "Bundle" and isinstance(doc.get("entry"), list):
        for i, entry in enumerate(doc["entry"]):
            if isinstance(entry, dict) and "resource" in entry:
                checked += check_resource(entry["resource"], f"{label} entry[{i}]", problems)
    return checked


def documents(text: str, source: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, parsed JSON) from a JSON document or NDJSON text."""
    stripped = text.strip()
    if not stripped:
        return
    try:
        doc = json.loads(stripped)
    except json.JSONDecodeError:
        doc = None
        whole_failed = True
    else:
        whole_failed = False
    if not whole_failed:
        if isinstance(doc, list):  # a JSON array of resources
            for i, item in enumerate(doc):
                yield f"{source}[{i}]", item
        else:
            yield source, doc
        return
    # A stream of JSON documents: NDJSON, or pretty-printed documents one after another.
    decoder = json.JSONDecoder()
    stream: list[tuple[str, Any]] = []
    pos, n = 0, len(text)
    try:
        while True:
            while pos < n and text[pos].isspace():
                pos += 1
            if pos >= n:
                break
            lineno = text.count("\n", 0, pos) + 1
            value, pos = decoder.raw_decode(text, pos)
            stream.append((f"{source}:{lineno}", value))
    except json.JSONDecodeError:
        pass
    else:
        yield from stream
        return
    # Not parseable as a stream: treat as NDJSON and report each bad line.
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{source}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{source}:{lineno}", _ParseError(str(exc))


class _ParseError:
    def __init__(self, msg: str) -> None:
        self.msg = msg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Validate FHIR R4 JSON resources with fhir.resources R4B models."
    )
    ap.add_argument("files", nargs="*", help="JSON/NDJSON files; '-' or none for stdin")
    ap.add_argument("-q", "--quiet", action="store_true", help="print nothing when all are valid")
    args = ap.parse_args(argv)

    sources = args.files or ["-"]
    if sources == ["-"] and sys.stdin.isatty():
        ap.error("no files given and stdin is a terminal")

    problems: list[tuple[str, list[str]]] = []
    checked = 0
    for src in sources:
        if src == "-":
            text, name = sys.stdin.read(), "<stdin>"
        else:
            try:
                with open(src, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                sys.stderr.write(f"fhir_check: cannot read {src}: {exc}\n")
                return 2
            name = src
        for where, doc in documents(text, name):
            if isinstance(doc, _ParseError):
                problems.append((where, [f"invalid JSON: {doc.msg}"]))
                checked += 1
                continue
            checked += check_resource(doc, where, problems)

    if checked == 0:
        sys.stderr.write("fhir_check: no resources found in input\n")
        return 1
    if problems:
        sys.stderr.write(f"fhir_check: {len(problems)} of {checked} resource(s) invalid\n")
        for label, lines in problems:
            sys.stderr.write(f"INVALID {label}\n")
            for line in lines:
                sys.stderr.write(f"    {line}\n")
        return 1
    if not args.quiet:
        print(f"fhir_check: {checked} resource(s) valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
