"""A fake tap for landing checks: `users` records with keys that repeat (id = i % KEYS + 1).

Integer id, a string and a date-time: the shape that makes duckdb >= 1.3 sniff the first row of
target-duckdb 0.8.0's header-less CSV as a header and drop it (FACTS.md, duckdb/duckdb#21653).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    records, keys = int(sys.argv[1]), int(sys.argv[2])
    stream = sys.argv[3] if len(sys.argv) > 3 else "users"
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": ["integer"]},
            "email": {"type": ["string", "null"]},
            "signed_up_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }
    out = [{"type": "SCHEMA", "stream": stream, "schema": schema, "key_properties": ["id"]}]
    for i in range(records):
        record = {"id": i % keys + 1, "email": f"u{i}@example.org"}
        record["signed_up_at"] = f"2026-01-{i % 28 + 1:02d}T10:00:00Z"
        out.append({"type": "RECORD", "stream": stream, "record": record})
    out.append({"type": "STATE", "value": {"bookmarks": {stream: {"n": records}}}})
    sys.stdout.write("".join(json.dumps(m) + "\n" for m in out))


if __name__ == "__main__":
    main()
