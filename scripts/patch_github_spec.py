"""Make GitHub's OpenAPI description usable by Prism for nimbus's contract tests.

GitHub documents its responses as `application/json`, but clients are told
to send `Accept: application/vnd.github+json`, which Prism then refuses with
406. This adds `application/vnd.github+json` beside every `application/json`
response, and nothing else.

usage: patch_github_spec.py IN.json OUT.json
"""
import json
import sys

src, dst = sys.argv[1], sys.argv[2]
spec = json.load(open(src))
patched = 0
for path in spec.get("paths", {}).values():
    for op in path.values():
        if not isinstance(op, dict):
            continue
        for resp in op.get("responses", {}).values():
            content = resp.get("content") if isinstance(resp, dict) else None
            if content and "application/json" in content and "application/vnd.github+json" not in content:
                content["application/vnd.github+json"] = content["application/json"]
                patched += 1
for resp in spec.get("components", {}).get("responses", {}).values():
    content = resp.get("content", {})
    if "application/json" in content and "application/vnd.github+json" not in content:
        content["application/vnd.github+json"] = content["application/json"]
        patched += 1
json.dump(spec, open(dst, "w"))
print(f"patched {patched} responses", file=sys.stderr)
