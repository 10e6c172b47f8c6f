"""A fake tap of keyed streams: records with the ids of each range `FIRST-LAST`, in order.

`--streams a,b` (default `orders,users`); `--repeat N` sends each record N times (an upsert stream
whose keys repeat); `--text-keys` makes the ids strings; `--no-keys` sends no key properties;
`--tag T` goes into every `name`, so a
second run's updates differ. Integer id, a string and a date-time: what target-duckdb 0.8.0 loads.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ranges", nargs="+")
    parser.add_argument("--streams", default="orders,users")
    parser.add_argument("--tag", default="v1")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--text-keys", action="store_true")
    parser.add_argument("--no-keys", action="store_true", help="no key_properties: an append")
    args = parser.parse_args()
    kind = "string" if args.text_keys else "integer"
    out = []
    ids = []
    for span in args.ranges:
        first, _, last = span.partition("-")
        ids += list(range(int(first), int(last or first) + 1))
    for stream in args.streams.split(","):
        schema = {
            "type": "object",
            "properties": {
                "id": {"type": [kind]},
                "name": {"type": ["string", "null"]},
                "changed_at": {"type": ["string", "null"], "format": "date-time"},
            },
        }
        keys = [] if args.no_keys else ["id"]
        out.append({"type": "SCHEMA", "stream": stream, "schema": schema, "key_properties": keys})
        for n in range(args.repeat):
            for i in ids:
                key: object = f"k-{i}" if args.text_keys else i
                record = {"id": key, "name": f"{stream} {i} {args.tag} copy {n}"}
                record["changed_at"] = f"2026-02-{i % 28 + 1:02d}T08:00:00Z"
                out.append({"type": "RECORD", "stream": stream, "record": record})
        bookmark = {"last_id": max(ids)}
        out.append({"type": "STATE", "value": {"bookmarks": {stream: bookmark}}})
    sys.stdout.write("".join(json.dumps(m) + "\n" for m in out))


if __name__ == "__main__":
    main()
