"""DALI's WebDataset index (``shard-000000.idx``), built from offsets known while writing.

Format (DALI's ``wds2idx`` writes the same bytes): a first line
``v1.2 <num_samples>``, then one line per sample repeating
``<ext> <data_offset> <size> <member_name>`` for each of its members, where
``ext`` is everything after the first dot of the member's name and
``data_offset`` points at the member's data (a multiple of 512). With it,
``nvidia.dali.fn.readers.webdataset`` starts without scanning every tar.

A sample's layout is recorded relative to the sample's start
(:func:`sample_layout`), so exact packing can move samples between archives
and shift their offsets (:func:`idx_line`) without reading the tar again.
"""

from __future__ import annotations

from typing import Iterable, Sequence

VERSION = "v1.2"
#: Between a layout's members: a control character, which no key holds (keys may hold ',' and ':').
MEMBER_SEP = "\x1f"


def sample_layout(names: Sequence[str], data_offsets: Sequence[int], sizes: Sequence[int]) -> str:
    """A sample's members as ``name:offset:size`` relative to the sample's start, :data:`MEMBER_SEP`-separated."""
    if len(names) == 1:  # most samples (an image alone): no generator, no join
        return f"{names[0]}:{data_offsets[0]}:{sizes[0]}"
    return MEMBER_SEP.join(f"{n}:{o}:{s}" for n, o, s in zip(names, data_offsets, sizes))


def idx_line(sample_start: int, layout: str) -> str:
    """The index line of a sample that starts at ``sample_start`` in its tar."""
    parts = []
    for member in layout.split(MEMBER_SEP):
        name, offset, size = member.rsplit(":", 2)
        parts.append(f"{name.split('.', 1)[1]} {sample_start + int(offset)} {size} {name}")
    return " ".join(parts)


def idx_bytes(lines: Iterable[str]) -> bytes:
    """The whole ``.idx`` file of a shard whose samples have these index lines."""
    lines = list(lines)
    return (f"{VERSION} {len(lines)}\n" + "".join(f"{line}\n" for line in lines)).encode("ascii")
