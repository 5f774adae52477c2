"""Stream a shard's tar once: parse and check every header, hash every byte, group samples.

Reads the archive front to back in bounded chunks (never the whole file),
taking its SHA-256, each sample's XXH3-64 over its members' bytes, and
checking what a damaged archive shows: a header whose checksum, magic or type
is wrong, non-zero padding, an archive cut short, missing end-of-archive
blocks, bytes after them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from ..core.tarshard import BLOCK
from ..format.checksums import new_sample_hasher

_ZERO_BLOCK = bytes(BLOCK)


@dataclass
class Member:
    """One member as found in the archive."""

    name: str
    header_offset: int
    data_offset: int
    size: int


@dataclass
class Sample:
    """Consecutive members sharing a key, with their byte range and checksum."""

    key: str
    start: int
    end: int = 0
    checksum: str = ""
    members: list[Member] = field(default_factory=list)


@dataclass
class TarScan:
    """What one pass over an archive found."""

    size: int = 0
    sha256: str = ""
    samples: list[Sample] = field(default_factory=list)
    damage: list[tuple[str | None, str]] = field(default_factory=list)  # (member, what)
    kept: dict[str, bytes] = field(default_factory=dict)  # small members the caller kept, by name


class _Stream:
    """Reads exactly what is asked (less only at the end), hashing every byte; knows its position."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.position = 0
        self.sha = hashlib.sha256()

    def read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = self.f.read(min(left, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        self.sha.update(data)
        self.position += len(data)
        return data

    def skip_rest(self) -> tuple[int, bool]:
        """Read to the end; return (bytes read, whether they were all zero)."""
        total, zero = 0, True
        while chunk := self.read(1 << 20):
            total += len(chunk)
            zero = zero and not chunk.strip(b"\0")
        return total, zero


def _octal(field_bytes: bytes) -> int:
    """A header's octal number field; only octal digits (no sign, no underscores), else ``ValueError``."""
    text = field_bytes.rstrip(b"\0 ").lstrip(b" ")
    if text.strip(b"01234567"):
        raise ValueError(f"not an octal number: {text!r}")
    return int(text, 8) if text else 0


def header_problem(header: bytes) -> str | None:
    """Why a 512-byte block is not a valid USTAR regular-file header, or ``None``."""
    try:
        recorded = _octal(header[148:156])
    except ValueError:
        return "its header checksum field is not a number"
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if recorded != actual:
        return f"its header checksum is {recorded}, the header sums to {actual}"
    if header[257:263] != b"ustar\0":
        return "its header lacks the USTAR magic"
    if header[156:157] not in (b"0", b"\0"):
        return f"it is not a regular file (type {header[156:157]!r})"
    try:
        _octal(header[124:136])
    except ValueError:
        return "its size field is not a number"
    return None


def _member_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"{prefix}/{name}" if prefix else name


def scan_tar(f: BinaryIO, *, keep: Callable[[str], bool] = lambda name: False,
             on_data: Callable[[Member, bytes], None] | None = None) -> TarScan:
    """Read the archive ``f`` once (see the module docstring).

    Parameters
    ----------
    f : binary file
    keep : callable
        ``keep(member_name)``: pass this member's data to ``on_data``.
    on_data : callable, optional
        Called with each kept member and its data, as it is read.

    Returns
    -------
    TarScan
        A sample whose ``end`` is 0 was cut off by damage.
    """
    scan = TarScan()
    stream = _Stream(f)
    hasher = None
    previous: str | None = None
    while True:
        offset = stream.position
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            scan.damage.append((previous, "the archive ends without its end-of-archive blocks (it was cut short)"
                                if not header else f"the archive ends inside a header at byte {offset}"))
            break
        if header == _ZERO_BLOCK:
            _close_sample(scan, hasher, offset)
            if stream.read(BLOCK) != _ZERO_BLOCK:
                scan.damage.append((previous, "the end-of-archive marker is incomplete or damaged"))
            rest, zero = stream.skip_rest()
            if not zero:
                scan.damage.append((previous, f"{rest} bytes after the end-of-archive marker are not all zero"))
            break
        name = _member_name(header)
        problem = header_problem(header)
        if problem is not None:
            after = f" (the member after {previous})" if previous else " (the first member)"
            scan.damage.append((name if name.isprintable() and name else None,
                                f"the header at byte {offset}{after} is damaged: {problem}"))
            break
        key = name.split("/")[-1].split(".", 1)[0]
        if not scan.samples or scan.samples[-1].key != key:
            _close_sample(scan, hasher, offset)
            scan.samples.append(Sample(key, offset))
            hasher = new_sample_hasher()
        hasher.update(header)
        size = _octal(header[124:136])
        member = Member(name, offset, offset + BLOCK, size)
        scan.samples[-1].members.append(member)
        wanted = keep(name)
        data = _read_data(stream, size, hasher, wanted)
        if data is None:
            scan.damage.append((name, f"the archive is cut short inside this member ({size} bytes long)"))
            break
        padding = stream.read(-size % BLOCK)
        hasher.update(padding)
        if len(padding) < -size % BLOCK:
            scan.damage.append((name, "the archive is cut short in the padding after this member"))
            break
        if padding.strip(b"\0"):
            scan.damage.append((name, "the padding after this member is not zero"))
        if wanted and on_data is not None:
            on_data(member, data)  # empty members too: an empty caption is a kept member
        previous = name
    stream.skip_rest()  # after damage the scan stops early: the size and SHA-256 are still the whole file's
    scan.size = stream.position
    scan.sha256 = stream.sha.hexdigest()
    return scan


def _read_data(stream: _Stream, size: int, hasher, wanted: bool) -> bytes | None:
    """Read a member's data (kept only if ``wanted``); ``None`` if the archive ends first."""
    parts, left = [], size
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            return None
        hasher.update(chunk)
        if wanted:
            parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts) if wanted else b""


def _close_sample(scan: TarScan, hasher, end: int) -> None:
    if scan.samples and hasher is not None and not scan.samples[-1].end:
        scan.samples[-1].end = end
        scan.samples[-1].checksum = hasher.hexdigest()
