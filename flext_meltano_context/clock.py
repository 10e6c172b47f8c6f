"""Timestamps as the lineage log, state stamps and reports write them: ISO 8601 UTC with a `Z`.

One home for the format (issue 11: it existed twice), so every timestamp a run writes has
microseconds and a `Z` and sorts as text.
"""

from __future__ import annotations

import datetime as dt


def iso(moment: dt.datetime | None = None) -> str:
    """`moment` (now when None; naive means UTC) as an ISO 8601 UTC string with microseconds."""
    moment = moment or dt.datetime.now(dt.timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    text = moment.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def utc_now() -> str:
    """Now as an ISO 8601 UTC string with microseconds."""
    return iso()


def epoch_iso(epoch: float | None) -> str | None:
    """An epoch time (`time.time()`) as an ISO 8601 UTC string; None stays None."""
    if epoch is None:
        return None
    return iso(dt.datetime.fromtimestamp(epoch, dt.timezone.utc))
