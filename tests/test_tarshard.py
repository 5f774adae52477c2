"""The tar writer: plain USTAR headers, reproducible bytes, exact offsets."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading

import pytest

import dask_imgsink.core.tarshard as tarshard
from dask_imgsink.core.pool import run_beside
from dask_imgsink.core.tarshard import (
    BLOCK,
    RECORD,
    PendingDigest,
    RunBlocks,
    SampleBlock,
    SampleBytes,
    TarShardWriter,
    archive_size,
    hex_digest,
    member_bytes,
    member_header,
    write_archive,
    write_blocks,
    write_members_at,
)


def _write(members):
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    spans = [writer.add(name, data) for name, data in members]
    size = writer.close()
    return buf.getvalue(), spans, size


MEMBERS = [("a.jpg", b"x" * 1000), ("a.txt", "héllo".encode()), ("b.jpg", b""), ("b.json", b"{}")]


def test_headers_are_plain_ustar_without_pax():
    raw, _, _ = _write(MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [n for n, _ in MEMBERS]
        assert all(m.type == tarfile.REGTYPE for m in members)  # no 'x'/'g' PAX headers
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
        assert not tf.pax_headers
    assert raw[257:265] == b"ustar\x0000"


def test_same_members_give_identical_bytes():
    assert _write(MEMBERS)[0] == _write(MEMBERS)[0]


def test_offsets_point_at_member_data():
    raw, spans, size = _write(MEMBERS)
    assert size == len(raw) and size % RECORD == 0
    for (name, data), (offset, length) in zip(MEMBERS, spans):
        assert raw[offset: offset + length] == data
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert [(m.offset_data, m.size) for m in tf.getmembers()] == spans


def test_an_archive_of_whole_members_from_other_archives_reads_back_with_its_sha256():
    src, spans, _ = _write(MEMBERS)
    end_of_a = spans[1][0] + spans[1][1] + (-spans[1][1] % BLOCK)
    first = member_bytes("z.txt", b"first")
    out = io.BytesIO()
    size, sha = write_archive(out, [first, src[:end_of_a]])
    raw = out.getvalue()
    assert size == len(raw) and size % RECORD == 0 and sha == hashlib.sha256(raw).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert [m.name for m in tf.getmembers()] == ["z.txt", "a.jpg", "a.txt"]
        assert tf.extractfile("a.jpg").read() == b"x" * 1000
    with pytest.raises(ValueError, match="512-byte blocks"):
        write_archive(io.BytesIO(), [src[:700]])


def test_run_blocks_pickle_out_of_band_and_still_write_the_same_archive():
    """Dask pickles task results with protocol 5 and a buffer callback: a run's blocks must leave as
    buffers (not copied into the stream) and come back as views that write the same archive."""
    blocks = RunBlocks(member_bytes(f"{i}.jpg", bytes([i]) * (3000 + i)) for i in range(50))
    buffers = []
    stream = pickle.dumps(blocks, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 50 and len(stream) < 2000  # the bytes are in the buffers, not the stream
    received = pickle.loads(stream, buffers=[bytearray(b.raw()) for b in buffers])  # as off the wire
    assert isinstance(received, RunBlocks) and all(isinstance(b, memoryview) for b in received)
    assert [bytes(b) for b in received] == list(blocks)
    once, twice = io.BytesIO(), io.BytesIO()
    assert write_archive(once, list(blocks)) == write_archive(twice, received)
    assert once.getvalue() == twice.getvalue()
    again = pickle.loads(pickle.dumps(received, protocol=5, buffer_callback=buffers.append), buffers=buffers[50:])
    assert [bytes(b) for b in again] == list(blocks)  # a carried run moves on again
    assert pickle.loads(pickle.dumps(blocks, protocol=4)) == blocks  # older protocols: in band


def test_long_or_non_ascii_names_are_refused():
    with pytest.raises(ValueError, match="100 bytes"):
        member_header("k" * 97 + ".jpg", 1)
    with pytest.raises(ValueError, match="ASCII"):
        member_header("clé.jpg", 1)


@pytest.mark.parametrize("name, size", [("a.jpg", 0), ("k" * 95 + ".json", 123456), ("x_1.txt", 8**11 - 1)])
def test_headers_are_byte_identical_to_tarfiles_ustar(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    assert member_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii")


# ----------------------------------------------------------------------------- gathered writes


def _varied_blocks(count: int) -> list:
    """Whole-block pieces of different sizes and contents, as bytes and as memoryviews (received runs)."""
    blocks = [bytes([i % 251]) * (BLOCK * (1 + i % 5)) for i in range(count)]
    return [memoryview(b) if i % 3 == 0 else b for i, b in enumerate(blocks)]


def test_a_plain_file_gets_every_block_in_order_through_gathered_writes(tmp_path):
    import fsspec

    blocks = _varied_blocks(2500)  # more than one os.writev call takes
    expected = b"".join(bytes(b) for b in blocks)
    fs = fsspec.filesystem("file")
    with fs.open(str(tmp_path / "a.tar"), "wb") as out:
        out.write(b"\0" * BLOCK)  # in Python's buffer: it must go first
        write_blocks(out, blocks)
        out.write(b"\1" * BLOCK)  # and what follows after
    assert (tmp_path / "a.tar").read_bytes() == b"\0" * BLOCK + expected + b"\1" * BLOCK
    end = write_members_at(str(tmp_path / "b.tar"), BLOCK, blocks[:10], end=True)
    assert end == BLOCK + sum(len(b) for b in blocks[:10])
    assert (tmp_path / "b.tar").read_bytes() == bytes(BLOCK) + b"".join(bytes(b) for b in blocks[:10])


def test_gathered_writes_resume_after_a_short_write(tmp_path, monkeypatch):
    """A mock, for a kernel behaviour this test cannot trigger on demand: ``writev`` may write
    fewer bytes than asked (a signal, a quota); here every call writes at most 1,000 bytes."""
    import os

    from dask_imgsink.core import tarshard

    real = os.writev

    def short_writev(fd, buffers):
        return real(fd, [b"".join(bytes(b) for b in buffers)[:1000]])

    monkeypatch.setattr(tarshard.os, "writev", short_writev)
    blocks = _varied_blocks(40)
    with open(tmp_path / "a.tar", "wb") as out:
        write_blocks(out, blocks)
    assert (tmp_path / "a.tar").read_bytes() == b"".join(bytes(b) for b in blocks)
    monkeypatch.setattr(tarshard.os, "writev", lambda fd, buffers: 0)  # a file that takes nothing: an error, no loop
    with open(tmp_path / "b.tar", "wb") as out, pytest.raises(OSError, match="wrote nothing"):
        write_blocks(out, blocks)


def test_a_file_object_that_does_more_than_store_gets_each_block_through_its_own_write(tmp_path):
    import gzip

    import fsspec

    blocks = _varied_blocks(30)
    expected = b"".join(bytes(b) for b in blocks)
    seen = []

    class Counting(io.BufferedWriter):  # a subclass: its write may do more, so it is called
        def write(self, data):
            seen.append(len(data))
            return super().write(data)

    with Counting(io.FileIO(tmp_path / "a.tar", "wb")) as out:
        write_blocks(out, blocks)
    assert len(seen) == len(blocks) and (tmp_path / "a.tar").read_bytes() == expected
    with fsspec.filesystem("file").open(str(tmp_path / "b.tar.gz"), "wb", compression="gzip") as out:
        write_blocks(out, blocks)  # fsspec's local file around a compressor: never the raw descriptor
    assert gzip.decompress((tmp_path / "b.tar.gz").read_bytes()) == expected


def test_a_shard_writer_on_a_plain_file_writes_the_same_archive_as_on_any_other(tmp_path):
    members = [(f"s{i:04d}.jpg", bytes([i % 256]) * (700 * i % 90_000)) for i in range(300)]
    raw, spans, size = _write(members)  # BytesIO: one write per member
    with open(tmp_path / "a.tar", "wb") as out:
        writer = TarShardWriter(out)
        assert [writer.add(name, data) for name, data in members] == spans
        assert writer.close() == size
    assert (tmp_path / "a.tar").read_bytes() == raw
    assert writer.sha256 == hashlib.sha256(raw).hexdigest()


def _samples(count: int) -> list[SampleBlock]:
    return [SampleBlock.build([(f"s{i:03d}.jpg", bytes([i % 256]) * (5000 + 977 * i)), (f"s{i:03d}.txt", b"cap")])
            for i in range(count)]


def test_a_sample_holds_its_bytes_data_as_given_and_copies_any_other_buffer():
    """No copy of an image's bytes is made to lay out its sample (a run used to hold its
    partition's images twice); a buffer its owner can still change is copied once, so a
    sample never changes after its checksum is taken."""
    jpeg = b"\xff\xd8" + bytes(70_000) + b"\xff\xd9"
    block = SampleBlock.build([("k.jpg", jpeg), ("k.txt", b"a cat")])
    assert any(piece is jpeg for piece in block.data.pieces)
    assert bytes(block.data) == member_bytes("k.jpg", jpeg) + member_bytes("k.txt", b"a cat")
    assert len(block.data) == len(bytes(block.data)) and len(block.data) % BLOCK == 0
    assert block.sizes == (len(jpeg), 5) and block.data_offsets == (BLOCK, len(member_bytes("k.jpg", jpeg)) + BLOCK)
    changing = bytearray(b"abc" * 1000)
    held = SampleBlock.build([("m.jpg", changing), ("m.cls", memoryview(b"7"))])
    changing[:3] = b"xyz"
    assert bytes(held.data) == member_bytes("m.jpg", b"abc" * 1000) + member_bytes("m.cls", b"7")


def test_a_samples_checksum_from_its_pieces_is_that_of_its_joined_bytes():
    from dask_imgsink.format.checksums import pieces_checksum, sample_checksum

    for block in _samples(5):
        assert pieces_checksum(block.data.pieces) == sample_checksum(bytes(block.data))


def test_sample_bytes_pickle_their_large_pieces_out_of_band_and_write_the_same_archive(tmp_path):
    import sys

    samples = [block.data for block in _samples(20)]
    run = RunBlocks(samples)
    buffers = []
    stream = pickle.dumps(run, protocol=5, buffer_callback=buffers.append)
    assert [b.raw().nbytes for b in buffers] == [5000 + 977 * i for i in range(20)]  # each image out of band
    assert len(stream) < 20 * 4 * BLOCK + 2000  # headers and padding in band
    received = pickle.loads(stream, buffers=[bytearray(b.raw()) for b in buffers])  # as off the wire
    assert isinstance(received, RunBlocks) and received == samples
    assert pickle.loads(pickle.dumps(received, protocol=4)) == samples  # views pickle in band too
    assert sys.getsizeof(samples[3]) > len(samples[3])  # what Dask counts a result held in memory as
    joined = [bytes(s) for s in samples]
    expected = io.BytesIO()
    write_archive(expected, joined)
    for blocks in (samples, received):
        out = io.BytesIO()
        assert write_archive(out, blocks) == write_archive(io.BytesIO(), joined)
        assert out.getvalue() == expected.getvalue()
        with open(tmp_path / "a.tar", "wb") as plain:
            write_archive(plain, blocks)
        assert (tmp_path / "a.tar").read_bytes() == expected.getvalue()
    end = write_members_at(str(tmp_path / "b.tar"), BLOCK, samples[:4], end=True)
    assert (tmp_path / "b.tar").read_bytes() == bytes(BLOCK) + b"".join(joined[:4]) and end == BLOCK + sum(
        map(len, joined[:4]))


def test_a_shard_writer_writes_samples_alike_to_a_plain_file_a_stream_and_a_run(tmp_path):
    blocks = _samples(150)
    stream = io.BytesIO()
    streamed = TarShardWriter(stream)
    starts = [streamed.add_sample(b) for b in blocks]
    streamed.close()
    with open(tmp_path / "a.tar", "wb") as out:
        plain = TarShardWriter(out)
        assert [plain.add_sample(b) for b in blocks] == starts
        plain.close()
    assert (tmp_path / "a.tar").read_bytes() == stream.getvalue() and plain.sha256 == streamed.sha256

    class Run(list):
        takes_samples = True

        def write(self, data):
            self.append(data)

    run = Run()
    kept = TarShardWriter(run, checksum=False)
    assert [kept.add_sample(b) for b in blocks] == starts
    assert all(type(s) is SampleBytes for s in run) and len(run) == len(blocks)
    with tarfile.open(fileobj=io.BytesIO(stream.getvalue())) as tf:
        assert tf.extractfile("s149.jpg").read() == bytes([149]) * (5000 + 977 * 149)


def test_sha256_in_chunks_is_hashlibs_for_any_pieces_and_reuses_its_chunk():
    import random

    from dask_imgsink.format.checksums import Sha256InChunks

    rng = random.Random(7)
    chunk = Sha256InChunks.CHUNK
    sizes = [0, 1, 511, 2047, 70_000, chunk // 2 - 1, chunk // 2, chunk - 3, chunk, chunk + 5, 3, 900_000]
    pieces = [rng.randbytes(n) for n in sizes] + [memoryview(rng.randbytes(5000))[100:4000]]
    for order in range(3):
        rng.shuffle(pieces)
        ours, theirs = Sha256InChunks(), hashlib.sha256()
        for i, piece in enumerate(pieces):
            ours.update(piece)
            theirs.update(piece)
            if i == 4:
                assert ours.hexdigest() == theirs.hexdigest()  # midway, and the hash goes on
        assert ours.hexdigest() == theirs.hexdigest()
    assert Sha256InChunks().hexdigest() == hashlib.sha256().hexdigest()


def test_hashing_a_shard_does_not_wait_on_the_gil_for_every_image():
    """Beside a thread running Python, each GIL take-back after a hash may wait the switch
    interval (5 ms): 300 images hashed one update each took about 1.5 s here. In chunks, it is
    a few take-backs per shard. Timed loosely: only the order of magnitude matters."""
    import threading
    import time

    from dask_imgsink.core.tarshard import _sha256_of

    blocks = [block.data for block in _samples(300)]
    stop = threading.Event()

    def python_loop():
        while not stop.is_set():
            sum(range(100))

    busy = threading.Thread(target=python_loop)
    busy.start()
    try:
        start = time.perf_counter()
        digest = _sha256_of(blocks)
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        busy.join()
    assert digest == hashlib.sha256(b"".join(bytes(b) for b in blocks)).hexdigest()
    assert seconds < 0.6  # 300 take-backs at the switch interval would be 1.5 s


def test_sha256_in_chunks_keeps_a_few_spare_chunks_per_thread():
    import threading

    from dask_imgsink.format import checksums

    def finish_many():
        hashers = [checksums.Sha256InChunks() for _ in range(5)]
        for hasher in hashers:
            hasher.update(b"x" * 5000)
        for hasher in hashers:
            hasher.hexdigest()
        return len(checksums._SPARE.__dict__.get("chunks", []))

    kept = []
    thread = threading.Thread(target=lambda: kept.append(finish_many()))
    thread.start()
    thread.join()
    assert kept == [checksums._MOST_SPARE]  # five chunks used at once, two kept for the next hashers


def _archive_blocks(count: int, size: int) -> list[bytes]:
    return [member_bytes(f"s{i}.bin", bytes([i % 251]) * size) for i in range(count)]


def test_an_archive_left_pending_is_written_whole_and_its_digest_pickles_as_the_hex_string(tmp_path):
    blocks = _archive_blocks(20, 5000)
    path = tmp_path / "shard.tar"
    with open(path, "wb") as out:
        size, digest = write_archive(out, blocks, wait=False)
    assert isinstance(digest, PendingDigest)  # the writer went on without waiting for the hash
    data = path.read_bytes()
    assert len(data) == size and hex_digest(digest) == hashlib.sha256(data).hexdigest()
    moved = pickle.loads(pickle.dumps(digest))  # as Dask moves a result to another process or spills it
    assert type(moved) is str and moved == hashlib.sha256(data).hexdigest()
    assert hex_digest(moved) == moved
    with open(tmp_path / "waited.tar", "wb") as out:
        assert write_archive(out, blocks) == (size, moved)  # the default waits, as before


def test_archives_left_pending_never_hold_more_than_the_budget(tmp_path, monkeypatch):
    """A writer whose hashes would pass PENDING_HASH_BYTES waits for the oldest first, so pending
    hashes keep at most that much of the runs alive; an archive larger than the budget is hashed
    while it is written, as with wait=True."""
    one = archive_size(sum(map(len, _archive_blocks(8, 5000))))
    monkeypatch.setattr(tarshard, "PENDING_HASH_BYTES", 2 * one)
    helper_free = threading.Event()
    run_beside(helper_free.wait, 30)  # the helper thread is busy: every hash stays pending
    returned = []

    def write(n: int) -> None:
        with open(tmp_path / f"{n}.tar", "wb") as out:
            returned.append((n, write_archive(out, _archive_blocks(8, 5000), wait=False)))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    try:
        for thread in threads:
            thread.start()
            thread.join(timeout=0.5 if thread is not threads[-1] else 1.0)
        assert sorted(n for n, _ in returned) == [0, 1]  # two fit the budget; the third waits for the helper
    finally:
        helper_free.set()  # never leave this process's helper thread blocked
    threads[-1].join(timeout=30)
    assert sorted(n for n, _ in returned) == [0, 1, 2]
    for n, (size, digest) in returned:
        assert hex_digest(digest) == hashlib.sha256((tmp_path / f"{n}.tar").read_bytes()).hexdigest()
    with open(tmp_path / "large.tar", "wb") as out:
        _, digest = write_archive(out, _archive_blocks(40, 5000), wait=False)  # over the budget alone
    assert type(digest) is str and digest == hashlib.sha256((tmp_path / "large.tar").read_bytes()).hexdigest()
