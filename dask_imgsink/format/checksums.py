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

import xxhash

SHARD_CHECKSUM = "sha256"
SAMPLE_CHECKSUM = "xxh3_64"
SAMPLE_CHECKSUM_COLUMN = "sample_xxh3_64"


def sample_checksum(data: bytes | memoryview) -> str:
    """Hex XXH3-64 of one sample's tar bytes."""
    return xxhash.xxh3_64_hexdigest(data)


def pieces_checksum(pieces) -> str:
    """:func:`sample_checksum` of the bytes ``pieces`` make when joined, without joining them."""
    hasher = xxhash.xxh3_64()
    for piece in pieces:
        hasher.update(piece)
    return hasher.hexdigest()


def new_sample_hasher():
    """An incremental hasher giving the same digest as :func:`sample_checksum`."""
    return xxhash.xxh3_64()


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
