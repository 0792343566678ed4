"""Checks that schema/event.schema.json accepts and rejects exactly the fixtures in
schema/examples.json, with an independent JSON Schema implementation (the `jsonschema`
package). The Rust validator is checked against the same fixtures by a unit test in
auditrail-core, so the schema and the code cannot drift apart."""
import json
import pathlib
import sys

import jsonschema

here = pathlib.Path(__file__).parent
schema = json.loads((here / "event.schema.json").read_text())
examples = json.loads((here / "examples.json").read_text())
validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
validator.check_schema(schema)
failures = 0
for want, events in (("valid", examples["valid"]), ("invalid", examples["invalid"])):
    for i, event in enumerate(events):
        errors = list(validator.iter_errors(event))
        got = "valid" if not errors else "invalid"
        if got != want:
            failures += 1
            print(f"schema disagrees on {want}[{i}]: {[e.message for e in errors]}")
passed = len(examples["valid"]) + len(examples["invalid"]) - failures
print(f"schema: {passed} passed, {failures} failed")
sys.exit(1 if failures else 0)
