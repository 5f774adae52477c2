"""Rows -> tar shards + Parquet: the engine-free write loop under the stage and the accessor.

Each row is prepared on the process's encoder pool (bounded window): its image
encoded, its members (``key.jpg``, ``key.txt``, ``key.cls``, ``key.json``)
laid out as one block of tar bytes, and that block's checksum taken. The
calling thread writes the blocks in row order into rolling shards
(:class:`ShardRoller`), hashing each shard as it goes. A bad row raises
:class:`~dask_imgsink.errors.BadRowError` naming it, or is recorded as skipped.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Sequence

import pyarrow as pa

from ..errors import BadRowError, MissingDependencyError, RowProblem
from ..format.checksums import pieces_checksum, sha256_hex
from ..format.dali import idx_bytes, idx_line, sample_layout
from ..format.members import (
    JSON_EXT,
    LABEL_EXT,
    TEXT_EXT,
    json_member,
    label_member,
    text_member,
)
from ..format.schema import WRITER_COLUMNS, WRITER_FIELDS, write_parquet
from ..storage import remove_quietly
from .encode import EncodedImage, EncodeOptions, encode_image
from .keys import check_key
from .pool import map_ordered
from .tarshard import (
    PendingDigest,
    RunBlocks,
    SampleBlock,
    SampleBytes,
    TarShardWriter,
    content_limit,
)

logger = logging.getLogger("dask_imgsink")

ON_ERROR_CHOICES = ("raise", "skip")


@dataclass
class Rows:
    """The rows of one partition or batch, column by column.

    ``keys`` are raw (validated while writing); ``meta`` holds the user's
    metadata columns as Arrow, one row per image, or ``None`` for none.
    ``columns`` names the source column of images, keys, texts and labels,
    for the errors that name a row's column.
    """

    images: Sequence[Any]
    keys: Sequence[Any]
    texts: Sequence[Any] | None = None
    labels: Sequence[Any] | None = None
    meta: pa.Table | None = None
    columns: dict[str, str | None] = field(default_factory=dict)
    problems: dict[int, RowProblem] = field(default_factory=dict)  # rows already known bad (metadata)

    def column(self, role: str) -> str:
        """The source column of ``role`` ("image", "key", "text", "label")."""
        return self.columns.get(role) or role

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class ShardTarget:
    """Where one shard goes: the files to write and the tar name recorded in Parquet.

    ``idx_path`` is where its DALI index goes (``None``: none). An exact-packing
    *run* (``run=True``) is written to memory, not to files: its tar bytes and
    its index table (with each sample's member layout in a :data:`LAYOUT_COLUMN`,
    from which assembly writes the shards' DALI indexes) travel as the write
    task's result (:attr:`WrittenShard.run_blocks`, :attr:`WrittenShard.run_index`).
    """

    tar_path: str
    parquet_path: str
    tar_file: str
    idx_path: str | None = None
    run: bool = False


@dataclass
class WrittenShard:
    """A shard written by :func:`write_rows`: its target, counts, sizes, SHA-256s and formats."""

    target: ShardTarget
    num_images: int
    tar_bytes: int
    tar_sha256: str | PendingDigest = ""  # an assembled shard's may still be pending until its commit
    parquet_bytes: int = 0
    parquet_sha256: str = ""
    idx_bytes: int = 0
    idx_sha256: str = ""
    formats: dict[str, int] = field(default_factory=dict)
    sample_sizes: list[int] | None = None  # a run's samples' tar bytes, in order (exact packing cuts by them)
    run_blocks: list[SampleBytes] | None = None  # a run's samples' tar bytes, one block per sample, in order (RunBlocks)
    run_index: pa.Table | None = None  # a run's one row per sample (the shard schema + LAYOUT_COLUMN)
    run_keys: pa.Array | None = None  # a run's keys, kept when its bytes are dropped (to name duplicates)

    def without_run_data(self) -> "WrittenShard":
        """This run with its bytes and index dropped: what planning needs (counts, sizes, keys)."""
        keys = self.run_index.column("key") if self.run_index is not None else self.run_keys
        return replace(self, run_blocks=None, run_index=None, run_keys=keys)


#: A run's Parquet column holding each sample's member layout (see :mod:`~dask_imgsink.format.dali`).
LAYOUT_COLUMN = "_layout"


@dataclass(frozen=True)
class SkippedRow:
    """A row left out with ``on_error="skip"``, and why."""

    partition: int | str
    row: int
    key: str | None
    reason: str
    column: str | None = None


class PreparedSample(NamedTuple):
    """One row ready to write: its image's facts and its members as one block of tar bytes."""

    key: str
    image: EncodedImage
    block: SampleBlock
    checksum: str


def prepare_sample(key: str, image: EncodedImage, extra: list[tuple[str, bytes]]) -> PreparedSample:
    """Lay out a sample's members (image first) and take the block's checksum."""
    block = SampleBlock.build([(f"{key}.{image.extension}", image.data), *extra])
    return PreparedSample(key, image, block, pieces_checksum(block.data.pieces))


class _Blocks:
    """A write-only file that keeps the blocks written (each sample's immutable bytes), copying none."""

    takes_samples = True  # TarShardWriter hands it each sample's SampleBytes whole

    def __init__(self) -> None:
        self.blocks = RunBlocks()  # moved between workers without copies

    def write(self, data: bytes | SampleBytes) -> int:
        self.blocks.append(data)
        return len(data)

    def close(self) -> None:
        pass


@dataclass
class _OpenShard:
    target: ShardTarget
    handle: Any
    tar: TarShardWriter
    records: list[tuple] = field(default_factory=list)  # each sample's values of WRITER_FIELDS, in order
    meta_rows: list[int] = field(default_factory=list)
    rows_by_key: dict[str, int] = field(default_factory=dict)
    layouts: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.meta_rows)

    def column(self, name: str) -> list:
        """The values of the writer's column ``name``, one per sample."""
        position = WRITER_COLUMNS.index(name)
        return [record[position] for record in self.records]


class ShardRoller:
    """Writes samples into consecutive shards of at most ``images_per_tar`` images.

    Opens a shard when the first sample arrives or the current one is full,
    and finishes each shard (end-of-archive blocks, then its Parquet of one row
    per image) when it rolls over or at :meth:`close`. :meth:`abort` closes the
    open handle and removes every file this roller created.
    """

    def __init__(self, fs, target_for: Callable[[int], ShardTarget], images_per_tar: int | None,
                 meta: pa.Table | None, verbose: bool = False, checksums: bool = True,
                 max_shard_bytes: int | None = None) -> None:
        self.fs = fs
        self.checksums = checksums
        self.target_for = target_for
        self.images_per_tar = images_per_tar
        self.content_limit = None if max_shard_bytes is None else content_limit(max_shard_bytes)
        self.meta = meta if meta is not None and meta.num_columns else None
        self.verbose = verbose
        self.shards: list[WrittenShard] = []
        self.created: list[str] = []
        self.current: _OpenShard | None = None

    def add(self, row: int, sample: PreparedSample) -> None:
        """Append one prepared sample; ``row`` is its row in :attr:`meta`."""
        shard = self._shard_with_room(len(sample.block.data))
        start = shard.tar.add_sample(sample.block)
        block, image = sample.block, sample.image
        shard.records.append((  # in WRITER_FIELDS' order
            sample.key, shard.target.tar_file, block.names[0], start + block.data_offsets[0], block.sizes[0],
            start, len(block.data), sample.checksum, image.format, image.width, image.height, image.channels,
        ))
        shard.meta_rows.append(row)
        shard.rows_by_key.setdefault(sample.key, row)
        layout = sample_layout(block.names, block.data_offsets, block.sizes)
        shard.layouts.append(layout if shard.target.run else idx_line(start, layout))

    def row_in_shard(self, key: str, size: int) -> int | None:
        """The row of ``key``'s copy in the shard a sample of ``size`` tar bytes would go into, if any."""
        if self.current is None or self._full(size):
            return None  # it would start a shard
        return self.current.rows_by_key.get(key)

    def _full(self, size: int) -> bool:
        """Whether the open shard cannot take a sample of ``size`` tar bytes (an empty one always can)."""
        shard = self.current
        if shard is None or shard.count == 0:
            return False
        if self.images_per_tar and shard.count >= self.images_per_tar:
            return True
        return self.content_limit is not None and shard.tar.position + size > self.content_limit

    def _shard_with_room(self, size: int) -> _OpenShard:
        full = self._full(size)
        if self.current is None or full:
            if self.current is not None:
                self._finish(self.current)
            target = self.target_for(len(self.shards))
            if target.run:
                handle = _Blocks()  # a run stays in memory (see ShardTarget)
            else:
                self.created.append(target.tar_path)
                handle = self.fs.open(target.tar_path, "wb")
            self.current = _OpenShard(target, handle, TarShardWriter(handle, checksum=self.checksums))
        return self.current

    def _finish(self, shard: _OpenShard) -> None:
        self.current = None
        table = self._table(shard)
        if shard.target.run:
            self.shards.append(WrittenShard(shard.target, shard.count, shard.tar.position,
                                            formats=format_counts(shard.column("format")),
                                            sample_sizes=shard.column("sample_size"),
                                            run_blocks=shard.handle.blocks, run_index=table))
            return
        try:
            size = shard.tar.close()
        finally:
            shard.handle.close()  # closes the descriptor even when the flush fails (full disk)
        self.created.append(shard.target.parquet_path)
        parquet_size, parquet_sha = write_parquet(table, self.fs, shard.target.parquet_path)
        tar_sha = shard.tar.sha256 if self.checksums else ""
        written = WrittenShard(shard.target, shard.count, size, tar_sha, parquet_size, parquet_sha,
                               formats=format_counts(shard.column("format")))
        if shard.target.idx_path is not None:
            self.created.append(shard.target.idx_path)
            written.idx_bytes, written.idx_sha256 = write_idx(self.fs, shard.target.idx_path, shard.layouts)
        self.shards.append(written)
        logger.log(logging.INFO if self.verbose else logging.DEBUG,
                   "wrote %s (%d images, %d bytes)", shard.target.tar_path, shard.count, size)

    def _table(self, shard: _OpenShard) -> pa.Table:
        """The shard's Parquet table: the writer's columns, the user's metadata, a run's layouts."""
        values = list(zip(*shard.records)) or [()] * len(WRITER_FIELDS)  # column by column
        columns = [pa.array(column, f.type) for column, f in zip(values, WRITER_FIELDS, strict=True)]
        fields = list(WRITER_FIELDS)
        if self.meta is not None:
            taken = self.meta.take(pa.array(shard.meta_rows, pa.int64()))
            columns += list(taken.columns)
            fields += list(taken.schema)
        if shard.target.run:
            columns.append(pa.array(shard.layouts, pa.string()))
            fields.append(pa.field(LAYOUT_COLUMN, pa.string()))
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))

    def close(self) -> list[WrittenShard]:
        """Finish the open shard; return every shard written."""
        if self.current is not None:
            self._finish(self.current)
        return self.shards

    def abort(self) -> None:
        """Close the open handle (whatever it raises) and remove every file created."""
        if self.current is not None:
            try:
                self.current.handle.close()
            except Exception:  # a full disk fails the flush too; the file goes anyway
                pass
            self.current = None
        for path in self.created:
            remove_quietly(self.fs, path)


def format_counts(formats: Sequence[str]) -> dict[str, int]:
    """How many images of each format, e.g. ``{"jpeg": 998, "png": 2}``."""
    counts: dict[str, int] = {}
    for fmt in formats:
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def write_idx(fs, path: str, lines: Sequence[str]) -> tuple[int, str]:
    """Write a shard's DALI index from its samples' index lines; return its size and SHA-256."""
    data = idx_bytes(lines)
    with fs.open(path, "wb") as f:
        f.write(data)
    return len(data), sha256_hex(data)


def _check_keys(raw_keys: Sequence[Any], column: str,
                dali_index: bool) -> tuple[list[str | None], dict[int, RowProblem]]:
    """Validate every key; return the keys (``None`` where bad) and each bad key's problem.

    A repeated key is not decided here: see :class:`_Repeats`."""
    keys: list[str | None] = []
    problems: dict[int, RowProblem] = {}
    for i, raw in enumerate(raw_keys):
        try:
            keys.append(check_key(raw, dali_index))
        except RowProblem as problem:
            problems[i] = RowProblem(problem.reason, problem.fix, column)
            keys.append(None)
    return keys, problems


#: How :func:`write_rows` finds a repeated key: ``"rows"``, any earlier written row of these rows;
#: ``"shard"``, an earlier row in the shard it would go into; ``"plan"``, not at all (exact packing
#: under ``unique_keys="shard"``: the job's plan decides, knowing where the shards are cut).
REPEAT_RULES = ("rows", "shard", "plan")
_FIX = "make keys unique, e.g. ddf.drop_duplicates(subset='key')"


class _Repeats:
    """Which rows repeat a key already written, by a rule of :data:`REPEAT_RULES`.

    Only written rows count. A row left out for any reason (a bad image, a bad
    value) does not take its key, so the next good row with it is written, as
    it is when the two rows are in different partitions (exact packing drops
    repeats across partitions from the keys of written rows): which rows are
    written never depends on where the partitions split. A repeat is encoded
    before it is found to be one (whether the row before it is written is known
    only then); repeats are rare.
    """

    def __init__(self, rule: str, column: str, roller: ShardRoller) -> None:
        if rule not in REPEAT_RULES:
            raise ValueError(f"repeats={rule!r} is not one of {list(REPEAT_RULES)}")
        self.rule, self.column, self.roller = rule, column, roller
        self.rows: dict[str, int] = {}

    def problem(self, key: str, row: int, size: int) -> RowProblem | None:
        """The problem of writing ``row`` (``size`` tar bytes) with ``key``, if it is a repeat."""
        if self.rule == "rows" and key in self.rows:
            return RowProblem(f"the key is used twice (rows {self.rows[key]} and {row} of this partition)", _FIX,
                              self.column)
        first = self.roller.row_in_shard(key, size) if self.rule == "shard" else None
        if first is not None:
            return RowProblem(f"the key is used twice in one shard (rows {first} and {row} of this partition)",
                              _FIX, self.column)
        return None

    def taken(self, key: str, row: int) -> None:
        self.rows.setdefault(key, row)


def _in_column(column: str | None, make: Callable[[], Any]) -> Any:
    """Run ``make``; any failure becomes a :class:`RowProblem` of ``column`` (a missing package stays a job error)."""
    try:
        return make()
    except RowProblem as problem:
        raise RowProblem(problem.reason, problem.fix, problem.column or column) from None
    except MissingDependencyError:
        raise
    except Exception as exc:  # whatever a codec or a strange value raises still names its row
        raise RowProblem(
            f"writing this value failed ({type(exc).__name__}: {str(exc)[:300]})",
            "fix or drop the value (on_error='skip' leaves such rows out and records them)",
            column,
        ) from None


def _extra_members(rows: Rows, i: int, key: str, meta_rows: list[dict] | None) -> list[tuple[str, bytes]]:
    """The ``key.txt``, ``key.cls`` and ``key.json`` members of row ``i``, where it has them."""
    extra = []
    if rows.texts is not None:
        text = _in_column(rows.column("text"), lambda: text_member(rows.texts[i]))
        if text is not None:
            extra.append((f"{key}.{TEXT_EXT}", text))
    if rows.labels is not None:
        label = _in_column(rows.column("label"), lambda: label_member(rows.labels[i]))
        if label is not None:
            extra.append((f"{key}.{LABEL_EXT}", label))
    if meta_rows is not None:
        extra.append((f"{key}.{JSON_EXT}", _in_column(None, lambda: json_member(meta_rows[i]))))
    return extra


def _nothing_to_encode(images: Sequence[Any], options: EncodeOptions) -> bool:
    """Whether every image is already-encoded bytes that will pass through (checked, not decoded).

    Preparing such a row is a few microseconds of Python holding the GIL: on the
    encoder pool it would cost more in hand-offs than it saves.
    """
    if options.reencode or options.validate == "decode":
        return False
    return all(type(image) in _ENCODED_TYPES for image in images)


_ENCODED_TYPES = (bytes, bytearray, memoryview, dict)


class _Done:
    """The outcome of one call run here, read as a done future's (``result()`` returns or raises).

    Like :class:`concurrent.futures.Future` as :func:`~dask_imgsink.core.pool.map_ordered`
    yields it, without the lock and condition a future makes: a future made, set and read
    took 2.3 us here against 0.2, out of about 35 us of Python a pass-through row takes.
    """

    __slots__ = ("_value", "_error")

    def __init__(self, fn: Callable[[int], Any], item: int) -> None:
        self._error: Exception | None = None
        try:
            self._value = fn(item)
        except Exception as exc:
            self._value, self._error = None, exc

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


def write_rows(
    rows: Rows,
    *,
    fs,
    target_for: Callable[[int], ShardTarget],
    images_per_tar: int | None,
    options: EncodeOptions,
    on_error: str = "raise",
    partition: int | str = 0,
    encode_threads: int | None = None,
    verbose: bool = False,
    shard_checksums: bool = True,
    max_shard_bytes: int | None = None,
    repeats: str = "rows",
    dali_index: bool = False,
) -> tuple[list[WrittenShard], list[SkippedRow]]:
    """Encode and write ``rows`` as shards of at most ``images_per_tar`` images.

    Parameters
    ----------
    rows : Rows
    fs : fsspec filesystem
    target_for : callable
        ``target_for(i)`` names the ``i``-th shard of these rows.
    images_per_tar : int or None
        Images per shard; ``None`` writes one shard of every row.
    options : EncodeOptions
    on_error : {"raise", "skip"}
    partition : int or str
        Named in errors and skip records.
    encode_threads : int, optional
        Encoder pool size (default: the process's CPUs).
    verbose : bool
        Log each shard at INFO level (DEBUG otherwise).
    shard_checksums : bool
        Take each tar's SHA-256 while writing it; off for exact packing's staged
        runs, whose bytes are hashed when they are copied into their shards.
    max_shard_bytes : int, optional
        A shard also closes before a sample that would make its tar larger than
        this; a sample larger on its own gets a shard of its own.
    repeats : {"rows", "shard", "plan"}
        Which later row with a written row's key is a bad row: any (default),
        one that would go into the same shard, or none (a plan decides later).
    dali_index : bool
        The shards get DALI indexes (now, or when a plan assembles them): a key with
        a space, which an index cannot hold, is a bad row.

    Returns
    -------
    shards : list of WrittenShard
    skipped : list of SkippedRow

    Raises
    ------
    BadRowError
        For the first bad row when ``on_error="raise"``; files this call
        started are closed and removed first.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR_CHOICES)}")
    keys, problems = _check_keys(rows.keys, rows.column("key"), dali_index)
    problems = {**rows.problems, **problems}
    meta_rows = rows.meta.to_pylist() if rows.meta is not None and rows.meta.num_columns else None

    def prepare(i: int) -> PreparedSample | None:
        if i in problems:
            return None
        image = _in_column(rows.column("image"), lambda: encode_image(rows.images[i], options))
        return prepare_sample(keys[i], image, _extra_members(rows, i, keys[i], meta_rows))

    roller = ShardRoller(fs, target_for, images_per_tar, rows.meta, verbose, shard_checksums, max_shard_bytes)
    written = _Repeats(repeats, rows.column("key"), roller)
    skipped: list[SkippedRow] = []
    try:
        if _nothing_to_encode(rows.images, options):
            prepared = (_Done(prepare, i) for i in range(len(rows)))  # in this thread: no pool round trips
        else:
            prepared = map_ordered(prepare, range(len(rows)), encode_threads)
        # closed even when this raises: a traceback holds this frame, and an open map_ordered
        # would count as an encoding caller of the process for as long as it lives
        with closing(prepared):
            for i, fut in enumerate(prepared):
                problem = problems.get(i)
                if problem is None:
                    try:
                        sample = fut.result()
                    except RowProblem as exc:
                        problem = exc
                if problem is None:
                    problem = written.problem(keys[i], i, len(sample.block.data))
                if problem is not None:
                    shown_key = keys[i] if keys[i] is not None else str(rows.keys[i])
                    if on_error == "raise":
                        raise BadRowError(problem.reason, fix=problem.fix, partition=partition, row=i,
                                          key=shown_key, column=problem.column)
                    skipped.append(SkippedRow(partition, i, shown_key, problem.reason, problem.column))
                    continue
                written.taken(keys[i], i)
                roller.add(i, sample)
        return roller.close(), skipped
    except BaseException:
        roller.abort()
        raise
