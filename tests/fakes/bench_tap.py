#!/usr/bin/env python3
"""A synthetic Singer tap for benchmarks: `$BENCH_RECORDS` records of stream `events`, fast.

Writes in 1 MiB blocks of pre-formatted lines so the tap itself costs little next to the relay,
then one STATE. Accepts (and ignores) --config/--catalog/--state; --discover prints the catalog.
"""

from __future__ import annotations

import json
import os
import sys

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "amount": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
    },
}
TEMPLATE = (
    '{"type":"RECORD","stream":"events","record":{"id":%d,"name":"user %d",'
    '"email":"user%d@example.com","amount":%d,"created_at":"2026-11-01T12:00:00Z"}}\n'
)


def main() -> None:
    """Print the catalog on --discover; otherwise SCHEMA, the records and one STATE."""
    out = sys.stdout.buffer
    if "--discover" in sys.argv:
        stream = {"tap_stream_id": "events", "stream": "events", "schema": SCHEMA, "metadata": []}
        out.write(json.dumps({"streams": [stream]}).encode() + b"\n")
        return
    total = int(os.environ.get("BENCH_RECORDS", "10"))
    header = {"type": "SCHEMA", "stream": "events", "schema": SCHEMA, "key_properties": ["id"]}
    out.write(json.dumps(header).encode() + b"\n")
    block: list[str] = []
    for i in range(total):
        block.append(TEMPLATE % (i, i, i, i % 9973))
        if len(block) == 5000:
            out.write("".join(block).encode())
            block.clear()
    out.write("".join(block).encode())
    state = {"type": "STATE", "value": {"bookmarks": {"events": {"id": total}}}}
    out.write(json.dumps(state).encode() + b"\n")
    out.flush()


if __name__ == "__main__":
    main()
