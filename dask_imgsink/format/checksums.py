"""The dataset's checksums: SHA-256 per file, XXH3-64 per sample.

- Each shard's SHA-256 and size go in ``_index.json`` (``sha256``,
  ``filesize``), and so do its Parquet file's (``parquet_sha256``,
  ``parquet_filesize``): ``sha256sum`` checks them with no library of ours.
- Each sample's checksum goes in its Parquet row (``sample_xxh3_64``): XXH3-64
  of the sample's tar bytes, ``[sample_offset, sample_offset + sample_size)``,
  which are its members' headers, data and padding. They do not depend on where
  the sample sits, so the checksum survives exact packing's copies. XXH3 runs
  about 30x faster than SHA-256 here (1.1 us against 37 us for a 66 kB JPEG,
  against about 700 us to encode it), so checking every sample costs nothing
  noticeable; it detects damage, not forgery (the file SHA-256s do that).
- Parquet files also carry Parquet's own page CRCs.
"""

from __future__ import annotations

import hashlib
import threading

import xxhash

SHARD_CHECKSUM = "sha256"
SAMPLE_CHECKSUM = "xxh3_64"
SAMPLE_CHECKSUM_COLUMN = "sample_xxh3_64"


def sample_checksum(data: bytes | memoryview) -> str:
    """Hex XXH3-64 of one sample's tar bytes."""
    return xxhash.xxh3_64_hexdigest(data)


def pieces_checksum(pieces) -> str:
    """:func:`sample_checksum` of the bytes ``pieces`` make when joined, without joining them."""
    hasher = new_sample_hasher()
    for piece in pieces:
        hasher.update(piece)
    return hasher.hexdigest()


def new_sample_hasher():
    """An incremental hasher giving the same digest as :func:`sample_checksum`."""
    return xxhash.xxh3_64()


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Sha256InChunks:
    """SHA-256 of buffers fed one at a time, hashed in chunks of about 4 MiB.

    ``hashlib`` lets other threads run while it hashes a buffer of 2 kB or more,
    and takes the GIL back after each. Beside a thread running Python, each
    take-back waits up to the interpreter's switch interval (5 ms): hashing 500
    images of 70 kB one update each took 2.5 s beside a Python loop, against
    20 ms alone, and 66 ms in 4 MiB chunks. So buffers smaller than a chunk are
    copied into one first (a copy that holds the GIL, about 0.4 ms per chunk), in
    a buffer kept per thread between hashers, so no new memory is touched per shard.
    """

    CHUNK = 4 * 2**20

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._chunk: memoryview | None = None
        self._used = 0

    def update(self, data: bytes | memoryview) -> None:
        size = memoryview(data).nbytes
        if size >= self.CHUNK // 2:
            self._flush()
            self._digest.update(data)
            return
        if self._chunk is None:
            self._chunk = _spare_chunk(self.CHUNK)
        elif self._used + size > self.CHUNK:
            self._flush()
        self._chunk[self._used:self._used + size] = memoryview(data).cast("B")
        self._used += size

    def _flush(self) -> None:
        if self._used:
            self._digest.update(self._chunk[:self._used])
            self._used = 0

    def hexdigest(self) -> str:
        """The hex SHA-256 of every byte fed so far (more may follow)."""
        self._flush()
        if self._chunk is not None:
            spare = _SPARE.__dict__.setdefault("chunks", [])
            if len(spare) < _MOST_SPARE:
                spare.append(self._chunk)
            self._chunk = None
        return self._digest.hexdigest()


_SPARE = threading.local()  # each thread's chunk buffers not in use
_MOST_SPARE = 2  # kept per thread (a hasher may end on another thread than it began)


def _spare_chunk(size: int) -> memoryview:
    chunks = _SPARE.__dict__.get("chunks")
    return chunks.pop() if chunks else memoryview(bytearray(size))
