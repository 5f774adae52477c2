"""Streaming, deterministic USTAR tar writer that records where each member's data lies.

Headers are plain USTAR (no PAX extension headers, which DALI's and wids' tar
readers reject), with fixed mtime, uid, gid, owner names and mode, so the same
members give byte-identical archives. Nothing is buffered beyond a few MiB of
whole members, written to plain local files with few system calls
(:func:`write_blocks`).
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import pickle
import tarfile
import threading
from collections import deque
from concurrent.futures import Future
from typing import BinaryIO, Iterator, NamedTuple

from fsspec.implementations.local import LocalFileOpener

from ..format.checksums import Sha256InChunks
from .pool import per_process, run_beside

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar's default record size; tarfile pads the same way
_ZEROS = bytes(RECORD)

#: Fixed header fields: the same content always gives the same bytes.
MTIME = 0
MODE = 0o644


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


# The fields that never change: mode, uid, gid, mtime, type '0' (regular file),
# USTAR magic and version; owner names and device numbers stay NUL, as tarfile leaves them.
_TEMPLATE = bytearray(BLOCK)
_TEMPLATE[100:108] = _octal(MODE, 8)
_TEMPLATE[108:116] = _octal(0, 8)
_TEMPLATE[116:124] = _octal(0, 8)
_TEMPLATE[136:148] = _octal(MTIME, 12)
_TEMPLATE[148:156] = b" " * 8  # the checksum counts its own field as spaces
_TEMPLATE[156:157] = tarfile.REGTYPE
_TEMPLATE[257:265] = b"ustar\x0000"
_TEMPLATE = bytes(_TEMPLATE)
_TEMPLATE_SUM = sum(_TEMPLATE)
# The template's bytes after a name of each length up to the size field, and around the checksum.
_AFTER_NAME = tuple(_TEMPLATE[length:124] for length in range(101))
_MTIME_FIELD = _TEMPLATE[136:148]
_AFTER_CHECKSUM = _TEMPLATE[155:]
_MAX_SIZE = 8**11 - 1  # what 11 octal digits hold (8 GiB)


def archive_size(content: int) -> int:
    """The size of an archive whose members take ``content`` bytes: end blocks, padded to a record."""
    end = content + 2 * BLOCK
    return end + (-end % RECORD)


def content_limit(max_archive_bytes: int) -> int:
    """The most member bytes an archive of at most ``max_archive_bytes`` can hold (negative: none)."""
    return (max_archive_bytes // RECORD) * RECORD - 2 * BLOCK


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file member.

    Byte for byte what ``tarfile`` writes in ``USTAR_FORMAT`` for the same
    fields, built directly because it is on the per-image hot path.

    Raises
    ------
    ValueError
        If ``name`` is not ASCII or longer than 100 bytes, or ``size`` too large.
    """
    if len(name) > 100 or not name.isascii():
        raise ValueError(f"tar member name {name!r} must be ASCII and at most 100 bytes")
    if not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"tar member {name!r} of {size} bytes is larger than USTAR allows")
    raw = name.encode("ascii")
    size_field = b"%011o\0" % size
    # The template's name and size fields are NUL: their sum adds only what goes in them.
    checksum = b"%06o\0" % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return b"".join((raw, _AFTER_NAME[len(raw)], size_field, _MTIME_FIELD, checksum, _AFTER_CHECKSUM))


def member_pieces(name: str, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview, bytes]:
    """One whole member as its three pieces: header, data and zero padding to the next block."""
    size = len(data)
    return member_header(name, size), data, _ZEROS[: -size % BLOCK]


def member_bytes(name: str, data: bytes | memoryview) -> bytes:
    """One whole member: header, data and zero padding to the next block."""
    return b"".join(member_pieces(name, data))


#: Pieces at least this large leave a pickle (protocol 5) as buffers of their own; smaller ones
#: (headers, padding) go in the stream, as one frame each would cost more than their bytes.
_OUT_OF_BAND = 4096


class SampleBytes:
    """One sample's tar bytes as the pieces they are made of: each member's header, data and
    padding, in order, never joined.

    The data pieces are the encoder's output or the caller's own ``bytes`` (a
    pass-through image), held, not copied: joining them cost a copy of every
    byte into new memory (measured here: 5 % of a pass-through job's CPU, and
    a run held its partition's images twice). ``len()`` is the tar bytes' size
    (a whole number of 512-byte blocks); ``bytes()`` joins them, for tests and
    small callers.
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces, size: int | None = None) -> None:
        self.pieces = tuple(pieces)
        # ``size``: the pieces' total bytes, when the caller knows it (it saves a pass over them)
        self.size = sum(memoryview(piece).nbytes for piece in self.pieces) if size is None else size

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def __eq__(self, other) -> bool:
        return isinstance(other, SampleBytes) and bytes(self) == bytes(other)

    __hash__ = None  # mutable pieces may be views; compared by content only

    def __sizeof__(self) -> int:
        # what Dask's memory accounting sees (it falls back to sys.getsizeof): the bytes held
        return object.__sizeof__(self) + self.size

    def __reduce_ex__(self, protocol):
        """With protocol 5 (how Dask moves and spills results) large pieces leave as buffers."""
        if protocol >= 5:
            return SampleBytes, (tuple(pickle.PickleBuffer(piece) if memoryview(piece).nbytes >= _OUT_OF_BAND
                                       else bytes(piece) for piece in self.pieces),)
        return SampleBytes, (tuple(bytes(piece) for piece in self.pieces),)


def buffers_of(blocks) -> Iterator:
    """The buffers ``blocks`` (bytes-like or :class:`SampleBytes`) are made of, in order, one at a time."""
    for block in blocks:
        if type(block) is SampleBytes:
            yield from block.pieces
        else:
            yield block


class SampleBlock(NamedTuple):
    """The tar bytes of one whole sample (its members, adjacent) and where each member's data lies.

    Built on an encoder thread, so the writer thread only writes it. The
    bytes do not depend on where the sample lands in a shard: a checksum of
    :attr:`data` stays valid when exact packing copies the sample into another shard.
    A named tuple: one is made per image, and a frozen dataclass of four fields took 2.5 times as long
    to make (560 against 220 ns here).
    """

    data: SampleBytes
    names: tuple[str, ...]
    data_offsets: tuple[int, ...]  # of each member's data, from the start of the block
    sizes: tuple[int, ...]

    @classmethod
    def build(cls, members: list[tuple[str, bytes]]) -> SampleBlock:
        """Lay out ``members``. ``bytes`` data is held as it is; any other buffer (a ``bytearray``,
        a view its owner may still change) is copied once, so the sample cannot change after its checksum."""
        pieces, offsets, sizes, position = [], [], [], 0
        for name, data in members:
            if type(data) is not bytes:
                data = bytes(data)
            header, data, padding = member_pieces(name, data)
            pieces += (header, data, padding) if padding else (header, data)
            offsets.append(position + BLOCK)
            sizes.append(len(data))
            position += BLOCK + len(data) + len(padding)
        return cls(SampleBytes(pieces, position), tuple(n for n, _ in members), tuple(offsets), tuple(sizes))


class RunBlocks(list):
    """Whole-member blocks of tar bytes (one per sample: bytes-like or :class:`SampleBytes`) that pickle *out of band*.

    Pickled with protocol 5 (as Dask does to move a task's result between
    workers or spill it to disk), each block becomes a separate buffer instead
    of being copied into the pickle stream: the sender copies nothing, and the
    receiver's blocks are views of the bytes it received (``memoryview``), so
    moving a run takes its size once in each process, not twice.
    """

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return RunBlocks, ([block if type(block) is SampleBytes else pickle.PickleBuffer(block)
                                for block in self],)
        return RunBlocks, (list(self),)


def _sha256_of(blocks) -> str:
    digest = Sha256InChunks()
    for block in buffers_of(blocks):
        digest.update(block)
    return digest.hexdigest()


class PendingDigest:
    """An archive's SHA-256 still being taken on this process's helper thread.

    :meth:`hexdigest` waits for it. Pickled (as Dask pickles a result it moves to
    another process or spills to disk), it waits too and becomes the plain hex
    string, so only the process that took it ever holds one.
    """

    __slots__ = ("_future",)

    def __init__(self, future: Future) -> None:
        self._future = future

    def hexdigest(self) -> str:
        return self._future.result()

    def __reduce__(self):
        return str, (self.hexdigest(),)


def hex_digest(digest: str | PendingDigest) -> str:
    """The hex SHA-256 ``digest`` holds, waiting for it if it is still being taken."""
    return digest if isinstance(digest, str) else digest.hexdigest()


#: Bytes of archives whose SHA-256 a process may leave pending (:func:`write_archive`):
#: what those hashes keep alive of the runs until they are done.
PENDING_HASH_BYTES = 64 * 2**20


def _sha256_left_pending(blocks: list, size: int) -> PendingDigest | None:
    """Start hashing ``blocks`` (``size`` bytes) on the helper thread, to be waited for later,
    once this process's pending hashes leave room for them; ``None`` if they never fit."""
    if size > PENDING_HASH_BYTES:
        return None
    pending, lock = per_process(("pending-hashes", 0), lambda: (deque(), threading.Lock()))
    while True:
        with lock:
            while pending and pending[0][0].done():
                pending.popleft()
            if sum(held for _, held in pending) + size <= PENDING_HASH_BYTES:
                future = run_beside(_sha256_of, blocks)
                pending.append((future, size))
                return PendingDigest(future)
            oldest = pending[0][0]
        oldest.result()  # outside the lock: the helper runs hashes in order, so this one ends first


def write_archive(fileobj: BinaryIO, blocks: list[bytes], *, wait: bool = True) -> tuple[int, str | PendingDigest]:
    """Write an archive of whole-member ``blocks`` (such as samples of other archives); return its size and SHA-256.

    The SHA-256 is taken on a helper thread while this one writes: both release
    the GIL, so the two overlap instead of adding up. With ``wait=False`` it may
    be returned still pending (a :class:`PendingDigest`), so the caller goes on
    while the helper hashes; a process leaves at most :data:`PENDING_HASH_BYTES`
    of archives pending, and waits for the oldest past that.
    """
    content = 0
    for block in blocks:
        if len(block) % BLOCK:
            raise ValueError("member blocks must be whole 512-byte blocks")
        content += len(block)
    size = archive_size(content)
    blocks = [*blocks, bytes(size - content)]  # end-of-archive marker and record padding
    if not wait and (pending := _sha256_left_pending(blocks, size)) is not None:
        write_blocks(fileobj, blocks)
        return size, pending
    digest = run_beside(_sha256_of, blocks)
    write_blocks(fileobj, blocks)
    return size, digest.result()


def write_members_at(path: str, offset: int, blocks: list, *, end: bool = False) -> int:
    """Write whole-member ``blocks`` into the file at ``path`` from ``offset`` (creating it if absent);
    return the offset after them. ``end``: they end the file (it is cut there); otherwise the rest
    of the file stays as it is.

    Writes at a known offset are idempotent: writing the same blocks again (a rerun) changes nothing.
    """
    for block in blocks:
        if len(block) % BLOCK:
            raise ValueError("member blocks must be whole 512-byte blocks")
    with open(path, "r+b" if os.path.exists(path) else "wb") as out:
        out.seek(offset)
        write_blocks(out, blocks)
        offset += sum(map(len, blocks))
        if end:
            out.truncate(offset)
    return offset


#: Most buffers one ``os.writev`` call takes (Linux's ``IOV_MAX``).
_IOV_MAX = 1024


def write_blocks(fileobj: BinaryIO, blocks: list) -> None:
    """Write ``blocks`` (bytes-like or :class:`SampleBytes`) to ``fileobj`` in order, from its current position.

    A plain local file (Python's own, or fsspec's local file without compression)
    gets them gathered into ``os.writev`` calls of up to 1,024 buffers: measured here
    (800 samples of 73 kB into a new file), one ``write`` per sample took 26-28 us of
    CPU per sample and ``writev`` 15-16, as a growing file pays per call. Any other
    file object (an object store's, a wrapper whose ``write`` does more) gets one
    ``write`` per buffer.
    """
    plain = _plain_file(fileobj)
    if plain is None:
        for buffer in buffers_of(blocks):
            fileobj.write(buffer)
        return
    plain.flush()  # what Python's buffer holds goes first
    _writev_all(plain.fileno(), list(buffers_of(blocks)))


def _plain_file(fileobj) -> io.BufferedIOBase | io.FileIO | None:
    """``fileobj``'s underlying plain local file, or ``None`` if its writes must go through its ``write``."""
    if type(fileobj) is LocalFileOpener:
        fileobj = fileobj.f
    if type(fileobj) in (io.BufferedWriter, io.BufferedRandom, io.FileIO) and hasattr(os, "writev"):
        return fileobj
    return None


def _writev_all(fd: int, blocks: list) -> None:
    """``os.writev`` every byte of ``blocks``, resuming after a short write."""
    pending = list(blocks)
    start = 0
    while start < len(pending):
        chunk = pending[start:start + _IOV_MAX]
        written = os.writev(fd, chunk)
        if written == 0 and any(memoryview(b).nbytes for b in chunk):
            raise OSError(errno.EIO, "writev wrote nothing")  # never loop on a file that takes no bytes
        while start < len(pending):
            size = memoryview(pending[start]).nbytes
            if written < size:
                pending[start] = memoryview(pending[start]).cast("B")[written:]
                break
            written -= size
            start += 1


def continue_archive(path: str, head_size: int, blocks: list) -> tuple[int, str]:
    """Finish the archive at ``path`` whose first ``head_size`` bytes (whole members) are written:
    write ``blocks`` after them, then the end-of-archive marker, and cut the file there.

    Returns its size and SHA-256. The head is read back for the hash (from the page cache,
    on a helper thread, while this one writes after it).
    """
    content = head_size + sum(map(len, blocks))
    tail = [*blocks, bytes(archive_size(content) - content)]
    with open(path, "rb") as head:
        digest = run_beside(_sha256_of, itertools.chain(_read_exactly(head, head_size), tail))
        try:
            write_members_at(path, head_size, tail, end=True)  # the end-of-archive marker is whole blocks too
        finally:
            sha256 = digest.result()  # before the head's file closes
    return archive_size(content), sha256


def _read_exactly(fileobj: BinaryIO, size: int, chunk: int = 1 << 20):
    while size:
        data = fileobj.read(min(chunk, size))
        if not data:
            raise OSError(f"{fileobj.name!r} ends {size} bytes before the head written to it")
        size -= len(data)
        yield data


class TarShardWriter:
    """Write tar members one at a time to a binary file object.

    Parameters
    ----------
    fileobj : file-like
        Opened for binary writing; positioned at the start of the archive.
    checksum : bool, default True
        Compute the SHA-256 of every byte written (:attr:`sha256`), while writing.

    Attributes
    ----------
    position : int
        Bytes written so far (the offset of the next member's header).
    """

    def __init__(self, fileobj: BinaryIO, checksum: bool = True) -> None:
        self._f = fileobj
        self._hash = Sha256InChunks() if checksum else None
        self.position = 0
        # a plain local file takes members together, in few system calls (write_blocks); a file object
        # with ``takes_samples`` (a run's list of blocks) each sample's SampleBytes whole; any other (an
        # object store's) each buffer as it comes
        self._gather = _plain_file(fileobj) is not None
        self._whole = getattr(fileobj, "takes_samples", False)
        self._pending: list = []
        self._pending_bytes = 0

    #: Bytes (or members) held for a plain local file before they go to it together.
    PENDING_BYTES = 4 * 2**20
    PENDING_BLOCKS = 64

    def _write(self, data: bytes | memoryview | SampleBytes) -> None:
        if self._hash is not None:
            for buffer in buffers_of((data,)):
                self._hash.update(buffer)
        self.position += len(data)
        if not self._gather:
            if self._whole or type(data) is not SampleBytes:
                self._f.write(data)
            else:
                for buffer in data.pieces:
                    self._f.write(buffer)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.PENDING_BYTES or len(self._pending) >= self.PENDING_BLOCKS:
            self.flush()

    def flush(self) -> None:
        """Hand the members held so far to the file."""
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            write_blocks(self._f, pending)

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """Append a member; return ``(data_offset, size)`` of its data in the archive."""
        offset = self.position + BLOCK
        self._write(member_bytes(name, data))
        return offset, len(data)

    def add_sample(self, block: SampleBlock) -> int:
        """Append a whole sample built by :meth:`SampleBlock.build`; return where it starts."""
        start = self.position
        self._write(block.data)
        return start

    def close(self) -> int:
        """Write the end-of-archive marker and pad to a whole record; return the size."""
        total = archive_size(self.position)
        self._write(bytes(total - self.position))
        self.flush()
        return total

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written so far (the whole archive after :meth:`close`)."""
        if self._hash is None:
            raise ValueError("this writer was created with checksum=False")
        return self._hash.hexdigest()
