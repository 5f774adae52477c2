"""Verify a written dataset: every byte against its checksum, every row against its tar.

One Dask task per shard streams the tar once (:mod:`~dask_imgsink.read.tarstream`)
and reads its Parquet; the client checks the directory as a whole. Each problem
names its shard, and its member where there is one. Nothing here raises for a
damaged dataset: damage is what it reports.

Per shard: the tar's size and SHA-256 against the index; every header, padding
and the end-of-archive blocks; the Parquet's size and SHA-256 against the index
and its page CRCs; its rows against the tar's samples in order (key, image
member, byte ranges, sample checksum); ``key.txt``/``key.cls``/``key.json``
rebuilt from the row and compared byte for byte, which tells which member of
a damaged sample changed; with ``decode``, every image decoded under the
dataset's ``max_pixels``. Dataset-wide: ``_index.json`` parses; ``_SUCCESS``
exists and names this index, the job that wrote it last and the SHA-256 of
``_errors.jsonl`` (every byte of it checked); no file is missing or unaccounted
for; no job's staging is left; ``_errors.jsonl`` agrees with the totals. Each DALI index
(``.idx``) is checked against the index's SHA-256 and rebuilt from the tar
scan, so an index that points at the wrong bytes is found too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import dask
import pyarrow as pa

from ..core.encode import DEFAULT_MAX_PIXELS, decode_encoded
from ..errors import RowProblem
from ..format.checksums import SAMPLE_CHECKSUM_COLUMN, sha256_hex
from ..format.dali import idx_bytes, idx_line, sample_layout
from ..format.index import (
    SUCCESS_ERRORS_FIELD,
    SUCCESS_FIELDS,
    IndexFormatError,
    job_for_shard,
    last_job,
    parse_index,
)
from ..format.layout import (
    EMPTY_PARQUET,
    ERRORS_FILE,
    INDEX_FILE,
    LAYOUT_VERSION,
    LEGACY_ERRORS_FILE,
    LEGACY_STAGING_DIR,
    SUCCESS_FILE,
    WORK_DIR,
    dataset_files,
    dataset_listing,
    idx_name,
    index_layout,
    legacy_staging,
    parquet_name,
)
from ..format.members import (
    JSON_EXT,
    LABEL_EXT,
    TEXT_EXT,
    json_rows,
    label_member,
    text_member,
)
from ..format.schema import WRITER_COLUMNS, parquet_bytes, parquet_from_bytes, recorded_schema
from ..format.skipped import read_errors
from ..storage import forget_listings, join, read_bytes, resolve
from .tarstream import Sample, TarScan, scan_tar


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (shard, member) and what."""

    shard: str | None
    member: str | None
    message: str

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.shard, self.member) if p)
        return f"{where}: {self.message}" if where else self.message


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found. ``ok`` when the dataset is complete and intact."""

    shards: int = 0
    images: int = 0
    bytes: int = 0
    complete: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems


@dataclass
class ShardReport:
    images: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ShardCheck:
    """What one verify task needs to know about its shard."""

    url: str
    storage_options: dict | None
    entry: dict
    job_options: dict
    decode: bool
    max_pixels: int
    layout: int = LAYOUT_VERSION


# ----------------------------------------------------------------------------- per shard


def verify_shard(check: ShardCheck) -> ShardReport:
    """Check one shard (the task run per shard); never raises for damage."""
    name = check.entry["url"]
    report = ShardReport()
    try:
        fs, root = resolve(check.url, check.storage_options)
        table = _read_shard_parquet(fs, root, check, report)
        scan = _scan_shard_tar(fs, root, check, table, report)
        if scan is not None and table is not None:
            _compare_rows(check, table, scan, report)
        if scan is not None and check.entry.get("idx"):
            _check_idx(fs, root, check, scan, report)
    except Exception as exc:  # an unreadable file, a broken connection: a problem, not a crash
        report.problems.append(Problem(name, None, f"could not be checked ({type(exc).__name__}: {exc})"))
    return report


def _read_shard_parquet(fs, root: str, check: ShardCheck, report: ShardReport):
    name = parquet_name(check.entry["url"], check.layout)
    data = read_bytes(fs, join(root, name))
    if data is None:
        report.problems.append(Problem(name, None, "is missing"))
        return None
    expected = check.entry.get("parquet_sha256")
    if expected and (len(data), sha256_hex(data)) != (check.entry.get("parquet_filesize"), expected):
        report.problems.append(Problem(name, None, "differs from the size and SHA-256 the index records"))
    try:
        table = parquet_from_bytes(data)
    except Exception as exc:
        report.problems.append(Problem(name, None, f"is not a readable Parquet file ({exc})"))
        return None
    missing = [c for c in WRITER_COLUMNS if c not in table.column_names]
    if missing:
        report.problems.append(Problem(name, None, f"lacks the columns {missing}"))
        return None
    return table


def _scan_shard_tar(fs, root: str, check: ShardCheck, table, report: ShardReport) -> TarScan | None:
    name = check.entry["url"]
    path = join(root, name)
    if not fs.exists(path):
        report.problems.append(Problem(name, None, "is missing"))
        return None
    formats = {}
    if check.decode and table is not None:
        formats = dict(zip(table.column("member").to_pylist(), table.column("format").to_pylist()))

    def keep(member: str) -> bool:
        return member in formats or member.rsplit(".", 1)[-1] in (TEXT_EXT, LABEL_EXT, JSON_EXT)

    kept: dict[str, bytes] = {}

    def on_data(member, data: bytes) -> None:
        if member.name in formats:
            _decode(name, member.name, data, formats[member.name], check.max_pixels, report)
        else:
            kept[member.name] = data

    with fs.open(path, "rb", block_size=8 << 20) as f:
        scan = scan_tar(f, keep=keep, on_data=on_data)
    scan.kept = kept
    report.bytes = scan.size
    for member, what in scan.damage:
        report.problems.append(Problem(name, member, what))
    if scan.size != check.entry["filesize"]:
        report.problems.append(Problem(name, None, f"is {scan.size} bytes, the index says {check.entry['filesize']}"))
    elif check.entry.get("sha256") and scan.sha256 != check.entry["sha256"]:
        report.problems.append(Problem(name, None, "does not match the SHA-256 the index records"))
    if len(scan.samples) != check.entry["nsamples"]:
        report.problems.append(Problem(name, None, f"holds {len(scan.samples)} samples, the index says "
                                                   f"{check.entry['nsamples']}"))
    return scan


def _check_idx(fs, root: str, check: ShardCheck, scan: TarScan, report: ShardReport) -> None:
    name = idx_name(check.entry["url"])
    data = read_bytes(fs, join(root, name))
    if data is None:
        report.problems.append(Problem(name, None, "is missing"))
        return
    if (len(data), sha256_hex(data)) != (check.entry.get("idx_filesize"), check.entry.get("idx_sha256")):
        report.problems.append(Problem(name, None, "differs from the size and SHA-256 the index records"))
    lines = [idx_line(sample.start, sample_layout([m.name for m in sample.members],
                                                  [m.data_offset - sample.start for m in sample.members],
                                                  [m.size for m in sample.members]))
             for sample in scan.samples]
    if data != idx_bytes(lines):
        report.problems.append(Problem(name, None, "does not describe the tar's members (DALI would read "
                                                   "the wrong bytes)"))


def _decode(shard: str, member: str, data: bytes, fmt: str, max_pixels: int, report: ShardReport) -> None:
    try:
        decode_encoded(data, fmt, max_pixels)
    except RowProblem as exc:
        report.problems.append(Problem(shard, member, f"was not decoded: {exc.reason} (pass a larger max_pixels)"))
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}"
        report.problems.append(Problem(shard, member, f"does not decode as {fmt.upper()} ({what})"))


def _expected_members(check: ShardCheck, table, row: int, json_bytes: list[bytes] | None) -> dict[str, bytes]:
    """``key.txt``/``key.cls``/``key.json`` of a row as the writer made them, where the Parquet says."""
    opts, key = check.job_options, table.column("key")[row].as_py()
    expected = {}
    for ext, column, make in ((TEXT_EXT, opts.get("text_column"), text_member),
                              (LABEL_EXT, opts.get("label_column"), label_member)):
        if column and column in table.column_names:
            value = make(table.column(column)[row].as_py())
            if value is not None:
                expected[f"{key}.{ext}"] = value
    if json_bytes is not None:
        expected[f"{key}.{JSON_EXT}"] = json_bytes[row]
    return expected


def _json_members(check: ShardCheck, table) -> list[bytes] | None:
    columns = [c for c in check.job_options.get("metadata_columns", []) if c in table.column_names]
    if not columns or len(columns) != len(check.job_options.get("metadata_columns", [])):
        return None
    return json_rows(table.select(columns))


def _compare_rows(check: ShardCheck, table, scan: TarScan, report: ShardReport) -> None:
    name = check.entry["url"]
    report.images = table.num_rows
    if table.num_rows != len(scan.samples):
        report.problems.append(Problem(name, None, f"its Parquet has {table.num_rows} rows for "
                                                   f"{len(scan.samples)} samples in the tar"))
    rows = table.select(["key", "tar_file", "member", "offset", "size", "sample_offset", "sample_size",
                         SAMPLE_CHECKSUM_COLUMN]).to_pylist()
    json_bytes = _json_members(check, table)
    for i, (row, sample) in enumerate(zip(rows, scan.samples)):
        where = f"Parquet row {i} (key {row['key']!r})"
        problem = _row_problem(row, sample, name)
        if problem is not None:
            report.problems.append(Problem(name, problem[0], f"{where}: {problem[1]}"))
            continue
        intact = bool(sample.end) and row[SAMPLE_CHECKSUM_COLUMN] == sample.checksum
        expected = _expected_members(check, table, i, json_bytes)
        differ = [m.name for m in sample.members if m.name in expected and scan.kept.get(m.name) != expected[m.name]]
        if intact:  # the tar's sample is as written, so the Parquet row is what changed
            for member in differ:
                report.problems.append(Problem(name, member, f"{where}: its metadata differs from this member, "
                                                             "which matches its sample checksum"))
        elif differ:
            for member in differ:
                report.problems.append(Problem(name, member, "differs from what was written (checked against "
                                                             "its Parquet row and the sample checksum)"))
        elif sample.end:
            rest = [m.name for m in sample.members if m.name not in expected]
            report.problems.append(Problem(name, " / ".join(rest) or None,
                                           "differs from what was written (the sample checksum does not match)"))


def _row_problem(row: dict, sample: Sample, shard: str) -> tuple[str | None, str] | None:
    if row["key"] != sample.key:
        return None, f"the tar's sample here is {sample.key!r}"
    if row["tar_file"] != shard:
        return None, f"names tar_file {row['tar_file']!r}"
    image = sample.members[0] if sample.members else None
    if image is None or image.name != row["member"]:
        return row["member"], f"the sample's first member is {image.name if image else None!r}"
    if (image.data_offset, image.size) != (row["offset"], row["size"]):
        return row["member"], (f"offset/size say {row['offset']}/{row['size']}, the image lies at "
                               f"{image.data_offset}/{image.size}")
    if sample.end and (sample.start, sample.end - sample.start) != (row["sample_offset"], row["sample_size"]):
        return None, (f"sample_offset/sample_size say {row['sample_offset']}/{row['sample_size']}, the sample "
                      f"lies at {sample.start}/{sample.end - sample.start}")
    return None


# ----------------------------------------------------------------------------- dataset


def _check_listing(fs, root: str, index: dict | None, report: VerifyReport) -> None:
    forget_listings(fs, root)
    owned = dataset_files(index) if index is not None else set()
    for name in dataset_listing(fs, root):
        if name == WORK_DIR or (name == LEGACY_STAGING_DIR and legacy_staging(fs, join(root, name))):
            report.problems.append(Problem(name, None, "a job's staging or lock is present: a job is writing "
                                                       "this dataset, or died (remove it with dask-imgsink clean)"))
        elif name == LEGACY_STAGING_DIR:
            report.problems.append(Problem(name, None, "is a stray folder, another tool's staging (Hadoop's and "
                                                       "Spark's are named so): not ours to remove"))
        elif index is not None and (name not in owned or (name == LEGACY_ERRORS_FILE and index_layout(index) >= 2)):
            kind = "shard" if name.endswith((".tar", ".parquet", ".idx")) and not name.startswith("_") else "file"
            report.problems.append(Problem(name, None, f"is a stray {kind}: the index does not list it"))


def _check_success(fs, root: str, index_bytes: bytes | None, index: dict | None, errors_bytes: bytes | None,
                   report: VerifyReport) -> None:
    data = read_bytes(fs, join(root, SUCCESS_FILE))
    report.complete = data is not None
    if data is None:
        report.problems.append(Problem(SUCCESS_FILE, None, "is missing: the dataset is not complete"))
        return
    try:
        record = json.loads(data) if data.strip() else None
    except ValueError:
        record = None
    if index is not None and index_layout(index) >= 2:  # every byte of it is this version's own
        problem = _success_problem(record, index) or _errors_file_problem(record, errors_bytes)
        if problem is not None:
            report.problems.append(problem)
            return
    recorded = record.get("index_sha256") if isinstance(record, dict) else None
    if recorded and index_bytes is not None and recorded != sha256_hex(index_bytes):
        report.problems.append(Problem(INDEX_FILE, None, f"is not the index {SUCCESS_FILE} was written for"))


def _success_problem(record, index: dict) -> Problem | None:
    """What is wrong with a ``_SUCCESS`` record against the index's last job (its digest is checked after)."""
    fields = sorted(record) if isinstance(record, dict) else None
    if fields not in (sorted(SUCCESS_FIELDS), sorted((*SUCCESS_FIELDS, SUCCESS_ERRORS_FIELD))):
        return Problem(SUCCESS_FILE, None, f"is not what a commit writes (a JSON object of {', '.join(SUCCESS_FIELDS)}"
                                           f" and, with rows skipped, {SUCCESS_ERRORS_FIELD}): it was changed")
    last = last_job(index)
    differing = [name for name in SUCCESS_FIELDS[:3] if record[name] != last.get(name)]
    if differing:
        return Problem(SUCCESS_FILE, None, f"its {', '.join(differing)} is not the index's last job's: it was changed")
    return None


def _errors_file_problem(record: dict, data: bytes | None) -> Problem | None:
    """``_errors.jsonl`` (``data``) against the SHA-256 ``_SUCCESS`` holds for it (datasets written before it did: none)."""
    recorded = record.get(SUCCESS_ERRORS_FIELD)
    if recorded is None:
        return None
    if data is None:
        return Problem(ERRORS_FILE, None, f"is missing, {SUCCESS_FILE} records its SHA-256")
    if sha256_hex(data) != recorded:
        return Problem(ERRORS_FILE, None, f"does not match the SHA-256 {SUCCESS_FILE} records for it (one of the two"
                                          " was changed)")
    return None


def _check_errors_file(index: dict, data: bytes | None, report: VerifyReport) -> None:
    """``_errors.jsonl`` (``data``) against the index's count of skipped rows."""
    skipped = (index.get("totals") or {}).get("skipped", 0)
    if not isinstance(skipped, int):
        report.problems.append(Problem(INDEX_FILE, None, "its totals.skipped is not a number"))
        return
    if index_layout(index) < 2:
        return  # older datasets kept their error records as Parquet
    if data is None:
        if skipped:
            report.problems.append(Problem(ERRORS_FILE, None, f"is missing, the index counts {skipped} skipped rows"))
        return
    if not skipped:  # a commit writes it only for skipped rows
        report.problems.append(Problem(ERRORS_FILE, None, "is present, but the index counts no skipped row: "
                                                          "no job of this dataset wrote it"))
        return
    try:
        rows = len(read_errors(data))
    except ValueError as exc:
        report.problems.append(Problem(ERRORS_FILE, None, f"is not readable JSON Lines of error records ({exc})"))
        return
    if rows != skipped:
        report.problems.append(Problem(ERRORS_FILE, None, f"lists {rows} rows, the index counts {skipped} skipped"))


def _check_empty_parquet(fs, root: str, index: dict, report: VerifyReport) -> None:
    """The stand-in Parquet of a dataset with no shard: there only then, with no row, in the recorded schema."""
    data = read_bytes(fs, join(root, EMPTY_PARQUET))
    recorded = recorded_schema(index)
    if index["shardlist"]:
        if data is not None:
            report.problems.append(Problem(EMPTY_PARQUET, None, "is present, but the dataset has shards: it stands "
                                                                "in only for a dataset with none"))
        return
    if data is None:  # releases before it wrote none, and it holds no data: nothing is lost
        return
    try:
        table = parquet_from_bytes(data)
    except (pa.ArrowException, OSError) as exc:
        report.problems.append(Problem(EMPTY_PARQUET, None, f"is not a readable Parquet file ({exc})"))
        return
    if recorded is not None:  # as Parquet stores it (date64 as date32, timestamp[s] as [ms], ...)
        recorded = parquet_from_bytes(parquet_bytes(recorded.empty_table())).schema
    if table.num_rows or (recorded is not None and not table.schema.equals(recorded, check_metadata=False)):
        report.problems.append(Problem(EMPTY_PARQUET, None, "is not the dataset's: it should hold no row, in the "
                                                            "schema its last job recorded"))


def _max_pixels(index: dict) -> int:
    recorded = [(j.get("options") or {}).get("max_pixels") for j in index.get("jobs", [])]
    return max([m for m in recorded if isinstance(m, int)] or [DEFAULT_MAX_PIXELS])


def _run(tasks: list, client) -> list:
    if client is not None:
        return client.gather(client.compute(tasks))
    return list(dask.compute(*tasks))


def verify_dataset(path: str, *, storage_options: dict | None = None, decode: bool = False, client=None,
                   max_pixels: int | None = None) -> VerifyReport:
    """Check a dataset written by :func:`~dask_imgsink.to_webdataset` (see the module docstring).

    Parameters
    ----------
    path : str
        The dataset directory (local path or fsspec URL).
    storage_options : dict, optional
        Passed to fsspec.
    decode : bool, default False
        Also decode every image.
    client : distributed.Client, optional
        Run the per-shard tasks there. By default they run on the active
        Client if there is one, else on threads in this process.
    max_pixels : int, optional
        Largest image decoded; default the largest any job of the dataset was
        written with (``to_webdataset(max_pixels=...)``).

    Returns
    -------
    VerifyReport
        ``report.ok`` when the dataset is complete and every check passed.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist (a usage error, not damage).
    """
    fs, root = resolve(path, storage_options)
    forget_listings(fs, root)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{path!r} is not a directory")
    report = VerifyReport()
    try:
        _verify_into(report, fs, root, path, storage_options, decode, client, max_pixels)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # damage no check foresaw, or a lost connection: a problem, not a crash
        report.problems.append(Problem(None, None, f"could not be checked further ({type(exc).__name__}: {exc})"))
    return report


def _verify_into(report: VerifyReport, fs, root: str, path: str, storage_options: dict | None, decode: bool,
                 client, max_pixels: int | None) -> None:
    index_bytes = read_bytes(fs, join(root, INDEX_FILE))
    index = None
    if index_bytes is None:
        report.problems.append(Problem(INDEX_FILE, None, "is missing"))
    else:
        try:
            index = parse_index(index_bytes)
        except IndexFormatError as exc:
            report.problems.append(Problem(INDEX_FILE, None, str(exc).removeprefix(f"{INDEX_FILE} ")))
    errors_bytes = read_bytes(fs, join(root, ERRORS_FILE))  # read once: _SUCCESS vouches for it, the index counts it
    _check_success(fs, root, index_bytes, index, errors_bytes, report)
    _check_listing(fs, root, index, report)
    if index is None:
        return
    _check_errors_file(index, errors_bytes, report)
    if index_layout(index) >= 2:
        _check_empty_parquet(fs, root, index, report)
    limit = max_pixels or _max_pixels(index)
    checks = [ShardCheck(path, storage_options, entry, job_for_shard(index, i).get("options") or {}, decode, limit,
                         index_layout(index))
              for i, entry in enumerate(index["shardlist"])]
    verify = dask.delayed(verify_shard, pure=True)
    token = dask.base.tokenize(path, decode, limit, index_bytes)
    tasks = [verify(check, dask_key_name=(f"imgsink-verify-{token}", i)) for i, check in enumerate(checks)]
    for shard in _run(tasks, client):
        report.shards += 1
        report.images += shard.images
        report.bytes += shard.bytes
        report.problems.extend(shard.problems)
