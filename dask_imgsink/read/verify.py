"""Reading a written dataset back and checking it: index, tars, Parquet and offsets agree."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field

from ..format.schema import read_parquet
from ..format.layout import INDEX_FILE, SUCCESS_FILE
from ..storage import join, resolve


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found."""

    shards: int = 0
    images: int = 0
    bytes: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems


def verify_dataset(path: str, storage_options: dict | None = None, decode: bool = False) -> VerifyReport:
    """Check a dataset written by :func:`~dask_imgsink.to_webdataset`.

    Every shard listed in ``_index.json`` is read with ``tarfile`` and its
    Parquet with pyarrow: sample counts, file sizes, keys, member names and the
    ``offset``/``size`` byte ranges must agree. With ``decode=True`` every image
    is also decoded with Pillow.

    Returns
    -------
    VerifyReport
        ``report.ok`` is true when the dataset is complete and consistent.
    """
    fs, root = resolve(path, storage_options)
    report = VerifyReport(complete=fs.exists(join(root, SUCCESS_FILE)))
    if not report.complete:
        report.problems.append(f"{SUCCESS_FILE} is missing: the dataset is not complete")
    index_path = join(root, INDEX_FILE)
    if not fs.exists(index_path):
        report.problems.append(f"{INDEX_FILE} is missing")
        return report
    with fs.open(index_path, "rb") as f:
        index = json.load(f)
    for entry in index["shardlist"]:
        _verify_shard(fs, root, entry, report, decode)
    return report


def _verify_shard(fs, root: str, entry: dict, report: VerifyReport, decode: bool) -> None:
    name = entry["url"]
    tar_path = join(root, name)
    parquet_path = join(root, name[: -len(".tar")] + ".parquet")
    report.shards += 1
    with fs.open(tar_path, "rb") as f:
        raw = f.read()
    report.bytes += len(raw)
    if len(raw) != entry["filesize"]:
        report.problems.append(f"{name}: {len(raw)} bytes, the index says {entry['filesize']}")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = tf.getmembers()
    keys = []
    for m in members:
        key = m.name.split(".", 1)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    if len(set(keys)) != len(keys):
        report.problems.append(f"{name}: a sample's members are not adjacent, or a key repeats")
    if len(keys) != entry["nsamples"]:
        report.problems.append(f"{name}: {len(keys)} samples, the index says {entry['nsamples']}")
    table = read_parquet(fs, parquet_path)
    report.images += table.num_rows
    if table.column("key").to_pylist() != keys:
        report.problems.append(f"{name}: the Parquet keys differ from the tar's samples")
    by_name = {m.name: m for m in members}
    for row in table.select(["member", "offset", "size", "tar_file"]).to_pylist():
        member = by_name.get(row["member"])
        if row["tar_file"] != name:
            report.problems.append(f"{name}: Parquet row names tar_file {row['tar_file']!r}")
        if member is None:
            report.problems.append(f"{name}: member {row['member']!r} is not in the tar")
        elif (member.offset_data, member.size) != (row["offset"], row["size"]):
            report.problems.append(f"{name}: offset/size of {row['member']!r} do not match the tar")
        elif decode:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(raw[row["offset"]: row["offset"] + row["size"]])) as img:
                    img.load()
            except Exception as exc:
                report.problems.append(f"{name}: {row['member']!r} does not decode ({exc})")
