"""Key canonicalization (one byte form for equal keys) and the bounded KeySet (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flext_meltano_context.errors import UsageError
from flext_meltano_context.keys import (
    KeyCollector,
    KeySet,
    Uncomparable,
    budget_from_env,
    canonical,
    decode,
)

SAFE_INT = st.integers(min_value=-(2**53), max_value=2**53)
TEXT = st.text()  # any unicode, lone surrogates included
SCALAR = st.one_of(st.integers(), TEXT, st.booleans(), st.none())


def raw(value: object, **options: object) -> bytes:
    return json.dumps(value, **options).encode()  # type: ignore[arg-type]  # json's kwargs


@given(SAFE_INT)
def test_an_integer_and_the_float_equal_to_it_are_one_key(number: int) -> None:
    forms = [raw(number), raw(float(number)), f"{number}e0".encode(), f"{number}.000".encode()]
    keys = {canonical([form]) for form in forms}
    assert len(keys) == 1
    assert decode(keys.pop()) == (number,)


@given(st.integers())
def test_any_integer_survives_canonical_form(number: int) -> None:
    assert decode(canonical([raw(number)])) == (number,)


@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)))
def test_a_non_integral_number_decodes_to_the_same_float(number: float) -> None:
    (value,) = decode(canonical([raw(number)]))
    assert isinstance(value, float)
    assert value == number


@given(TEXT)
def test_a_string_is_one_key_however_it_is_escaped(text: str) -> None:
    ascii_form = raw(text, ensure_ascii=True)
    keys = {canonical([ascii_form])}
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # lone surrogates: \\u escapes only
        keys.add(canonical([raw(text, ensure_ascii=False)]))
    assert len(keys) == 1
    assert decode(keys.pop()) == (text,)


@given(st.lists(SCALAR, min_size=1, max_size=4), st.lists(SCALAR, min_size=1, max_size=4))
def test_compound_keys_are_equal_exactly_when_their_values_are(
    left: list[object], right: list[object]
) -> None:
    def key(values: list[object]) -> bytes:
        return canonical([raw(v) for v in values])

    def typed(values: list[object]) -> list[tuple[str, object]]:
        return [(type(v).__name__, v) for v in values]  # True is no 1, "1" is no 1

    assert decode(key(left)) == tuple(left)
    assert (key(left) == key(right)) == (typed(left) == typed(right))


def test_a_string_of_digits_is_not_the_integer() -> None:
    assert canonical([b"1"]) != canonical([b'"1"'])
    assert canonical([b"true"]) != canonical([b"1"])


@pytest.mark.parametrize("text", [b'{"a": 1}', b"[1, 2]", b"NaN"], ids=["object", "array", "nan"])
def test_what_no_column_can_hold_decodes_as_uncomparable(text: bytes) -> None:
    (value,) = decode(canonical([text]))
    assert isinstance(value, Uncomparable)


def test_a_missing_property_is_null() -> None:
    assert decode(canonical([None])) == (None,)
    assert canonical([None]) == canonical([b"null"])


def test_the_collector_keeps_distinct_keys_of_keyed_streams_only() -> None:
    lines = [
        b'{"type":"SCHEMA","stream":"a","schema":{},"key_properties":["id","part"]}',
        b'{"type":"SCHEMA","stream":"b","schema":{},"key_properties":[]}',
        b'{"type":"RECORD","stream":"a","record":{"id":1,"part":"x"}}',
        b'{"type":"RECORD","stream":"a","record":{"id":1.0,"part":"x"}}',
        b'{"type":"RECORD","stream":"a","record":{"id":2,"part":"x"}}',
        b'{"type":"RECORD","stream":"b","record":{"id":1}}',
        b"not json",
    ]
    collector = KeyCollector()
    collector.feed(lines)
    assert collector.distinct() == {"a": 2}
    assert sorted(decode(k) for k in collector.keys.iter("a")) == [(1, "x"), (2, "x")]
    assert collector.keyed == {"a": True, "b": False}


@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=3000))
def test_a_key_set_past_its_budget_gives_each_key_once_and_counts_exactly(
    numbers: list[int],
) -> None:
    keys = KeySet(budget_bytes=4096)  # about 60 keys, then a run file on disk
    for start in range(0, len(numbers), 97):
        keys.add_many("s", [canonical([raw(n)]) for n in numbers[start : start + 97]])
    keys.add_many("t", [canonical([b"1"])])
    try:
        got = list(keys.iter("s"))
        assert len(got) == len(set(got)) == len(set(numbers)) == keys.count("s")
        assert sorted(decode(k)[0] for k in got) == sorted(set(numbers))
        assert list(keys.iter("t")) == [canonical([b"1"])]
        distinct = len(set(numbers))
        if distinct > 100:
            assert keys.spilled  # a budget of ~60 keys cannot hold them
        elif distinct < 20:
            assert not keys.spilled  # dropping repeats freed enough
    finally:
        keys.close()


def test_spilled_keys_live_in_the_given_directory_and_go_with_close(tmp_path: Path) -> None:
    keys = KeySet(budget_bytes=1000, spill_dir=tmp_path / "run")
    keys.add_many("s", [canonical([raw(n)]) for n in range(100)])
    assert keys.spills >= 1
    (folder,) = (tmp_path / "run").iterdir()
    assert list(folder.glob("*.keys"))
    keys.add_many("s", [canonical([raw(n)]) for n in range(50, 150)])
    assert keys.count("s") == 150  # repeats across memory and disk counted once
    keys.close()
    assert list((tmp_path / "run").iterdir()) == []


def test_a_key_set_under_its_budget_never_touches_the_disk(tmp_path: Path) -> None:
    keys = KeySet(spill_dir=tmp_path)
    keys.add_many("s", [canonical([raw(n)]) for n in range(1000)])
    assert (keys.count("s"), keys.spilled, list(tmp_path.iterdir())) == (1000, False, [])


@pytest.mark.parametrize(
    ("value", "budget"),
    [("", 256 << 20), ("64", 64 << 20), ("0.5", 1 << 19)],
    ids=["default", "whole", "fraction"],
)
def test_the_budget_setting_is_read_in_megabytes(value: str, budget: int) -> None:
    assert budget_from_env({"FLEXT_CONTEXT_LANDING_KEY_BUDGET_MB": value}) == budget


@pytest.mark.parametrize(
    "value", ["0", "-5", "lots", "nan"], ids=["zero", "negative", "word", "nan"]
)
def test_a_bad_budget_is_a_usage_error_naming_the_setting(value: str) -> None:
    with pytest.raises(UsageError, match="FLEXT_CONTEXT_LANDING_KEY_BUDGET_MB"):
        budget_from_env({"FLEXT_CONTEXT_LANDING_KEY_BUDGET_MB": value})


def test_repeats_are_dropped_in_memory_before_anything_spills(tmp_path: Path) -> None:
    keys = KeySet(budget_bytes=10_000, spill_dir=tmp_path)  # about 150 keys
    for _ in range(100):  # an upsert stream: 10 keys sent 100 times
        keys.add_many("s", [canonical([raw(n)]) for n in range(10)])
    assert (keys.count("s"), keys.spilled, list(tmp_path.iterdir())) == (10, False, [])
