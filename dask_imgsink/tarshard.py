"""Streaming, deterministic USTAR tar writer that records where each member's data lies.

Headers are plain USTAR (no PAX extension headers, which DALI's and wids' tar
readers reject), with fixed mtime, uid, gid, owner names and mode, so the same
members give byte-identical archives. Nothing is buffered beyond one member.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar's default record size; tarfile pads the same way
_ZEROS = bytes(RECORD)

#: Fixed header fields: the same content always gives the same bytes.
MTIME = 0
MODE = 0o644


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file member.

    Raises
    ------
    ValueError
        If ``name`` is not ASCII or longer than 100 bytes.
    """
    if len(name) > 100 or not name.isascii():
        raise ValueError(f"tar member name {name!r} must be ASCII and at most 100 bytes")
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MTIME
    info.mode = MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


class TarShardWriter:
    """Write tar members one at a time to a binary file object.

    Parameters
    ----------
    fileobj : file-like
        Opened for binary writing; positioned at the start of the archive.

    Attributes
    ----------
    position : int
        Bytes written so far (the offset of the next member's header).
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self.position = 0

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """Append a member; return ``(data_offset, size)`` of its data in the archive."""
        header = member_header(name, len(data))
        self._f.write(header)
        self._f.write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._f.write(_ZEROS[:pad])
        offset = self.position + BLOCK
        self.position = offset + len(data) + pad
        return offset, len(data)

    def copy_members(self, src: BinaryIO, start: int, length: int, chunk: int = 8 << 20) -> int:
        """Copy whole members (headers, data, padding) from another archive.

        ``start`` and ``length`` must be block-aligned and cover complete members,
        such as one or more whole samples written by :meth:`add`. Returns the
        position in this archive where the copied bytes begin. Memory is bounded
        by ``chunk``.
        """
        if start % BLOCK or length % BLOCK:
            raise ValueError("member ranges must be aligned to 512-byte blocks")
        begin = self.position
        src.seek(start)
        remaining = length
        while remaining:
            buf = src.read(min(chunk, remaining))
            if not buf:
                raise OSError(f"source archive ended {remaining} bytes early")
            self._f.write(buf)
            remaining -= len(buf)
        self.position += length
        return begin

    def close(self) -> int:
        """Write the end-of-archive marker and pad to a whole record; return the size."""
        end = self.position + 2 * BLOCK
        total = end + (-end % RECORD)
        self._f.write(bytes(total - self.position))
        self.position = total
        return total
