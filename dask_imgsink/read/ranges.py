"""Byte-range reads of one file: only the needed bytes move, in as few requests as sensible.

Ranges closer than :data:`MAX_GAP` are read as one (a sample's image sits
between its tar header and its ``.txt``/``.json`` members, a few hundred bytes
to a few KiB apart; one request costs more on an object store than reading
those bytes). Local files are opened once and read with ``seek``; other
filesystems get one ``cat_ranges`` call, which s3fs and its async peers run
concurrently.
"""

from __future__ import annotations

from ..storage import is_local

#: Ranges this close are fetched in one read; the gap bytes are read and dropped.
MAX_GAP = 8 * 2**10
#: No merged read grows beyond this.
MAX_BLOCK = 64 * 2**20


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge ``(start, end)`` ranges (sorted by start) that lie within :data:`MAX_GAP` of each other."""
    blocks: list[list[int]] = []
    for start, end in ranges:
        if blocks and start - blocks[-1][1] <= MAX_GAP and end - blocks[-1][0] <= MAX_BLOCK:
            blocks[-1][1] = max(blocks[-1][1], end)
        else:
            blocks.append([start, end])
    return [(start, end) for start, end in blocks]


def read_ranges(fs, path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each ``(start, end)`` range of ``path``, in the order given.

    Raises
    ------
    EOFError
        The file is shorter than a range says (it was truncated or replaced).
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    wanted = [ranges[i] for i in order]
    blocks = coalesce(wanted)
    data = _read_blocks(fs, path, blocks)
    out: list[bytes] = [b""] * len(ranges)
    block = 0
    for i, (start, end) in zip(order, wanted):
        while blocks[block][1] < end:
            block += 1
        offset = blocks[block][0]
        piece = data[block][start - offset:end - offset]
        if len(piece) != end - start:
            raise EOFError(f"{path} ends before byte {end} (the file was truncated or replaced)")
        out[i] = piece
    return out


def _read_blocks(fs, path: str, blocks: list[tuple[int, int]]) -> list[bytes]:
    if not blocks:
        return []
    if is_local(fs):
        with fs.open(path, "rb") as f:
            pieces = []
            for start, end in blocks:
                f.seek(start)
                pieces.append(f.read(end - start))
            return pieces
    return fs.cat_ranges([path] * len(blocks), [s for s, _ in blocks], [e for _, e in blocks])
