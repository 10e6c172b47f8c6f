"""A wrapper target: runs the real target-postgres, then deletes one landed row before exiting 0.

`python target_postgres_delete_one.py TARGET --config C --delete SCHEMA.TABLE:ID` (run with the
target's interpreter, which has psycopg). Stands for a target that says it loaded what it lost.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    argv = sys.argv[1:]
    at = argv.index("--delete")
    where, _, key = argv[at + 1].rpartition(":")
    schema, _, table = where.partition(".")
    target = argv[:at] + argv[at + 2 :]
    code = subprocess.run(target, check=False).returncode  # stdin and stdout are the target's
    if code != 0:
        return code
    config = json.loads(Path(target[target.index("--config") + 1]).read_text())
    psycopg: Any = importlib.import_module("psycopg")  # the target's own driver

    with psycopg.connect(
        host=config["host"],
        port=config["port"],
        user=config["user"],
        password=config["password"],
        dbname=config["database"],
    ) as conn:
        sql = f'DELETE FROM "{schema}"."{table}" WHERE id = %s'  # noqa: S608 - test names
        conn.execute(sql, (int(key),))
    return 0


if __name__ == "__main__":
    sys.exit(main())
