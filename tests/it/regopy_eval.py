"""The second Rego implementation for the policy tests: evaluates conftest-style rules (deny, violation, warn in
package main or nimbus) with regopy (rego-cpp) and prints {"denies": [...], "warnings": [...]} as JSON.
Usage: python regopy_eval.py INPUT.json POLICY.rego..."""
import json
import sys

from regopy import Interpreter


def values(out):
    text = str(out)
    if text.strip() == "undefined":
        return []
    doc = json.loads(text)
    found = []
    for expr in doc.get("expressions", []):
        items = expr if isinstance(expr, list) else [expr]
        for m in items:
            if isinstance(m, dict):
                m = m.get("msg")
            if isinstance(m, str):
                found.append(m)
    return found


def main():
    rego = Interpreter()
    for path in sys.argv[2:]:
        with open(path) as f:
            rego.add_module(path, f.read())
    with open(sys.argv[1]) as f:
        rego.set_input_term(f.read())
    denies, warnings = [], []
    for pkg in ("main", "nimbus"):
        for rule, into in (("deny", denies), ("violation", denies), ("warn", warnings)):
            into.extend(values(rego.query(f"data.{pkg}.{rule}")))
    print(json.dumps({"denies": sorted(set(denies)), "warnings": sorted(set(warnings))}))


main()
