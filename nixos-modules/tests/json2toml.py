#!/usr/bin/env python3
"""JSON on stdin -> TOML on stdout, for the evaluation test only.

Stands in for nixpkgs' pkgs.formats.toml (remarshal json2toml), which is
not available offline: tables, arrays of tables, and scalar values and
arrays of them. Nulls are refused (the modules never render them).
"""

import json
import re
import sys

BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def key(k):
    return k if BARE.match(k) else json.dumps(k)


def scalar(v):
    if v is None:
        raise SystemExit("json2toml: null has no TOML form")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    if isinstance(v, str):
        # JSON string escapes are valid TOML basic-string escapes.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{key(k)} = {scalar(x)}" for k, x in v.items()) + " }"
    raise SystemExit(f"json2toml: unsupported value {v!r}")


def is_table_array(v):
    return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)


def table(obj, path, out):
    simple = {k: v for k, v in obj.items() if not isinstance(v, dict) and not is_table_array(v)}
    for k, v in simple.items():
        out.append(f"{key(k)} = {scalar(v)}")
    for k, v in obj.items():
        if isinstance(v, dict):
            sub = path + [key(k)]
            out.append("")
            out.append("[" + ".".join(sub) + "]")
            table(v, sub, out)
        elif is_table_array(v):
            sub = path + [key(k)]
            for item in v:
                out.append("")
                out.append("[[" + ".".join(sub) + "]]")
                table(item, sub, out)


def main():
    out = []
    table(json.load(sys.stdin), [], out)
    sys.stdout.write("\n".join(out).lstrip("\n") + "\n")


if __name__ == "__main__":
    main()
