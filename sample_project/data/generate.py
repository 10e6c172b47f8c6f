#!/usr/bin/env python3
"""Write the sample users and orders as CSV files, the same bytes on every machine.

`generate.py` writes day 1 (the files shipped in the repository); `generate.py --day 2` writes the
next day's drop beside them, which the demo's second, incremental run picks up.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRST_DAY = datetime(2026, 11, 1, tzinfo=timezone.utc)
USERS_PER_DAY = {1: 2000, 2: 150}
ORDERS_PER_DAY = {1: 5000, 2: 400}
FIRST_NAMES = (
    "Ana",
    "Bruno",
    "Carla",
    "Diego",
    "Elena",
    "Farah",
    "Gustavo",
    "Hana",
    "Igor",
    "Julia",
    "Kenji",
    "Lucia",
    "Mateus",
    "Nadia",
    "Omar",
    "Paula",
    "Quentin",
    "Rafaela",
    "Sven",
    "Tomás",
    "Ursula",
    "Vitor",
    "Wen",
    "Xavier",
    "Yara",
    "Zoë",
)
LAST_NAMES = (
    "Almeida",
    "Becker",
    "Costa",
    "Dubois",
    "Estrada",
    "Fischer",
    "García",
    "Hoffmann",
    "Ito",
    "Jansen",
    "Kowalski",
    "Lima",
    "Müller",
    "Nakamura",
    "Oliveira",
    "Petrov",
    "Rossi",
    "Silva",
    "Takahashi",
    "Novák",
)
COUNTRIES = ("BR", "DE", "FR", "JP", "PT", "US", "GB", "ES", "IT", "NL")
PLANS = ("free", "free", "free", "pro", "pro", "team")
STATUSES = ("paid", "paid", "paid", "shipped", "delivered", "refunded", "cancelled")
CURRENCIES = {"BR": "BRL", "JP": "JPY", "US": "USD", "GB": "GBP"}


def users(day: int, rng: random.Random, first_id: int) -> list[dict[str, object]]:
    """`USERS_PER_DAY[day]` users signed up on `day`, ids from `first_id`."""
    start = FIRST_DAY + timedelta(days=day - 1)
    rows = []
    for user_id in range(first_id, first_id + USERS_PER_DAY[day]):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        signed_up = start + timedelta(seconds=rng.randrange(86400))
        rows.append(
            {
                "id": user_id,
                "email": f"{first}.{last}.{user_id}@example.com".lower(),
                "name": f"{first} {last}",
                "country": rng.choice(COUNTRIES),
                "plan": rng.choice(PLANS),
                "signed_up_at": signed_up.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    return rows


def orders(
    day: int, rng: random.Random, first_id: int, user_ids: list[int]
) -> list[dict[str, object]]:
    """`ORDERS_PER_DAY[day]` orders placed on `day` by any of `user_ids`."""
    start = FIRST_DAY + timedelta(days=day - 1)
    rows = []
    for order_id in range(first_id, first_id + ORDERS_PER_DAY[day]):
        ordered = start + timedelta(seconds=rng.randrange(86400))
        items = rng.randint(1, 6)
        rows.append(
            {
                "id": order_id,
                "user_id": rng.choice(user_ids),
                "status": rng.choice(STATUSES),
                "items": items,
                "amount_cents": items * rng.randrange(299, 15000),
                "ordered_at": ordered.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """A header line, then one line per row, UTF-8, Unix newlines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    """Generate day 1 (and every day before `--day`) so ids stay unique across days."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--day", type=int, choices=sorted(USERS_PER_DAY), default=1)
    day = parser.parse_args().day
    rng = random.Random(20261101)  # noqa: S311  # sample data, not secrets: one seed, same files
    next_user, next_order, user_ids = 1, 1, []
    for current in range(1, day + 1):
        new_users = users(current, rng, next_user)
        user_ids += range(next_user, next_user + len(new_users))
        new_orders = orders(current, rng, next_order, user_ids)
        next_user += len(new_users)
        next_order += len(new_orders)
    stamp = (FIRST_DAY + timedelta(days=day - 1)).strftime("%Y-%m-%d")
    write_csv(HERE / "users" / f"users-{stamp}.csv", new_users)
    write_csv(HERE / "orders" / f"orders-{stamp}.csv", new_orders)
    sys.stderr.write(f"wrote {len(new_users)} users and {len(new_orders)} orders for {stamp}\n")


if __name__ == "__main__":
    main()
