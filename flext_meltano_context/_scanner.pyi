"""Types of the compiled relay scanner (`_scanner.c`)."""

from typing_extensions import Buffer

ABI_VERSION: int
SOURCE_SHA256: str

def canonical(raw: Buffer, /) -> bytes | None: ...

class Scanner:
    key_bytes: int
    key_count: int
    def register(self, name: bytes, keys: tuple[bytes, ...] | None, /) -> None: ...
    def scan(
        self, buf: Buffer, start: int, stop: int, now: float, /
    ) -> tuple[int, int, int, int]: ...
    def streams(self) -> list[tuple[bytes, int, int, float | None, float | None]]: ...
    def drain(self) -> list[tuple[bytes, list[bytes]]]: ...
