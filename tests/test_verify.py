"""Provable integrity: verify finds every kind of damage, names its shard and member, and never crashes."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import xxhash
from helpers import make_ddf, make_frame, metadata_of

from dask_imgsink import BadRowError, verify_dataset
from dask_imgsink.cli import main

SHARD = "shard-000001.tar"


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A small dataset with image, text, label and json members, written once."""
    base = tmp_path_factory.mktemp("verify")
    out = base / "intact"
    make_ddf("from_pandas", [5, 4], base).imgsink.to_webdataset(
        str(out), key_column="key", text_column="caption", label_column="label", images_per_tar=3, compute=True)
    return out


@pytest.fixture
def out(intact, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(intact, copy)
    return copy


def _members(path):
    with tarfile.open(path) as tf:
        return {m.name: m for m in tf.getmembers()}


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _problems(out, **kwargs) -> list[str]:
    report = verify_dataset(str(out), **kwargs)
    assert not report.ok
    return [str(p) for p in report.problems]


def test_an_intact_dataset_passes(intact, capsys):
    report = verify_dataset(str(intact), decode=True)
    assert report.ok and report.shards == 3 and report.images == 9, report.problems
    assert main(["verify", str(intact), "--decode", "--scheduler", "threads"]) == 0
    assert "all consistent" in capsys.readouterr().out


@pytest.mark.parametrize("ext", ["jpg", "txt", "cls", "json"])
def test_a_flipped_byte_in_any_member_is_named(out, ext):
    member = _members(out / SHARD)[f"img00004.{ext}"]
    _flip(out / SHARD, member.offset_data + member.size // 2)
    problems = _problems(out)
    assert f"{SHARD}: does not match the SHA-256 the index records" in problems
    assert any(p.startswith(f"{SHARD}: img00004.{ext}: differs from what was written") for p in problems), problems


def test_a_damaged_header_is_named(out):
    member = _members(out / SHARD)["img00004.txt"]
    _flip(out / SHARD, member.offset + 10)  # inside the member's name field
    problems = _problems(out)
    assert any(f"{SHARD}: " in p and "header at byte" in p and "damaged" in p and "img00004.jpg" in p
               for p in problems), problems
    # the scan stops at the damage but still reads the whole file: its size is right, its SHA-256 is not
    assert f"{SHARD}: does not match the SHA-256 the index records" in problems
    assert not any("bytes, the index says" in p for p in problems), problems


def test_truncation_and_missing_end_blocks(out):
    data = (out / SHARD).read_bytes()
    (out / SHARD).write_bytes(data[:3000])
    problems = _problems(out)
    assert any("cut short" in p for p in problems) and any("bytes, the index says" in p for p in problems)
    (out / SHARD).write_bytes(data[: len(data) - 10240])  # the record holding the end-of-archive blocks
    assert any("without its end-of-archive blocks" in p for p in _problems(out))


def test_missing_and_extra_files(out):
    (out / "metadata/shard-000002.parquet").unlink()
    (out / "shard-000001.idx").unlink()
    (out / "shard-000000.tar").unlink()
    shutil.copy(out / SHARD, out / "shard-000009.tar")
    (out / "notes.txt").write_text("hello")
    problems = _problems(out)
    assert "metadata/shard-000002.parquet: is missing" in problems
    assert "shard-000001.idx: is missing" in problems
    assert "shard-000000.tar: is missing" in problems
    assert "shard-000009.tar: is a stray shard: the index does not list it" in problems
    assert "notes.txt: is a stray file: the index does not list it" in problems


@pytest.mark.parametrize("name, data", [("_errors.jsonl", b""), ("_errors.jsonl", b"\n\n"),
                                        ("_errors.parquet", None)])
def test_an_error_file_no_job_of_the_dataset_wrote_is_found(out, name, data):
    """The fixed names are the dataset's only when it wrote them: an errors file beside a dataset that
    skipped no row is foreign (and an old-layout ``_errors.parquet`` makes dd.read_parquet(out) fail)."""
    if data is None:
        pq.write_table(pa.table({"evil": [1]}), out / name)
    else:
        (out / name).write_bytes(data)
    problems = _problems(out)
    expected = ("is present, but the index counts no skipped row" if name.endswith(".jsonl")
                else "is a stray file: the index does not list it")
    assert [p for p in problems if p.startswith(name)] == [f"{name}: {expected}" + (
        ": no job of this dataset wrote it" if name.endswith(".jsonl") else "")]


def _rewrite_parquet(path, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def test_a_parquet_row_with_a_wrong_offset(out):
    path = out / metadata_of(SHARD)
    _rewrite_parquet(path, lambda t: t.set_column(
        t.schema.get_field_index("offset"), "offset", pc.add(t.column("offset"), 512)))
    problems = _problems(out)
    assert f"{metadata_of(SHARD)}: differs from the size and SHA-256 the index records" in problems
    assert any(p.startswith(f"{SHARD}: img00003.jpg: Parquet row 0 (key 'img00003'): offset/size say")
               for p in problems), problems


def test_tampered_metadata_names_the_row_and_member(out):
    path = out / metadata_of(SHARD)
    _rewrite_parquet(path, lambda t: t.set_column(
        t.schema.get_field_index("caption"), "caption", pa.array(["forged", *t.column("caption").to_pylist()[1:]])))
    problems = _problems(out)
    assert any(p.startswith(f"{SHARD}: img00003.txt: Parquet row 0 (key 'img00003'): its metadata differs")
               for p in problems), problems
    assert any(p.startswith(f"{SHARD}: img00003.json: Parquet row 0") for p in problems), problems


def test_swapped_tars(out):
    a, b = out / "shard-000000.tar", out / SHARD
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    problems = _problems(out)
    assert "shard-000000.tar: does not match the SHA-256 the index records" in problems
    assert any(p.startswith("shard-000000.tar: Parquet row 0 (key 'img00000'): the tar's sample here is 'img00003'")
               for p in problems), problems


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"shardlist": [{"url": 3}]}', b""])
def test_a_malformed_index_is_reported(out, content):
    (out / "_index.json").write_bytes(content)
    problems = _problems(out)
    assert any(p.startswith("_index.json: is not") for p in problems), problems


def test_missing_success_and_leftover_staging(out):
    (out / "_SUCCESS").unlink()
    (out / ".imgsink" / "jobs" / "abc").mkdir(parents=True)
    report = verify_dataset(str(out))
    assert not report.complete
    text = [str(p) for p in report.problems]
    assert "_SUCCESS: is missing: the dataset is not complete" in text
    assert any(p.startswith(".imgsink: a job's staging or lock is present") for p in text)


@pytest.mark.parametrize("damage", ["flip", "truncate", "index", "delete"])
def test_the_cli_exits_1_and_never_prints_a_traceback(out, damage):
    if damage == "flip":
        _flip(out / SHARD, 3000)
    elif damage == "truncate":
        (out / SHARD).write_bytes((out / SHARD).read_bytes()[:700])
    elif damage == "index":
        (out / "_index.json").write_text("{")
    else:
        (out / SHARD).unlink()
        (out / "_SUCCESS").unlink()
    proc = subprocess.run([sys.executable, "-m", "dask_imgsink.cli", "verify", str(out), "--scheduler", "threads"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "problem" in proc.stdout


def test_usage_errors_exit_2(tmp_path):
    for args in (["verify", str(tmp_path / "nowhere"), "--scheduler", "threads"],
                 ["verify", str(tmp_path), "--storage-option", "novalue", "--scheduler", "threads"],
                 ["verify"]):
        proc = subprocess.run([sys.executable, "-m", "dask_imgsink.cli", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_verify_runs_one_task_per_shard_on_the_cluster(intact, client):
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        report = verify_dataset(str(intact), client=client)
    assert report.ok, report.problems
    verify_tasks = [t for t in stream.data if t["key"][0].startswith("imgsink-verify-")]
    assert len(verify_tasks) == 3


def test_a_huge_image_we_wrote_verifies_with_decode(tmp_path):
    # 16000 x 16000 gray: beyond Pillow's default limit (~89 Mpx), within ours (16384^2)
    big = np.full((16000, 16000), 128, np.uint8)
    big[::1000, :] = 0
    pdf = pd.DataFrame({"key": ["big"], "image": pd.Series([big], dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=1)
    out = tmp_path / "big"
    ddf.imgsink.to_webdataset(str(out), key_column="key", compute=True)
    del big, pdf, ddf
    report = verify_dataset(str(out), decode=True)
    assert report.ok, report.problems
    # one limit for both directions: decoding under a smaller one names the member and the fix
    small = verify_dataset(str(out), decode=True, max_pixels=10_000_000)
    assert [str(p) for p in small.problems] == [
        "shard-000000.tar: big.jpg: was not decoded: the image is 16000x16000 = 256,000,000 pixels, more than "
        "max_pixels=10,000,000 (pass a larger max_pixels)"]


def test_writing_an_image_above_max_pixels_names_the_row(tmp_path):
    with pytest.raises(BadRowError) as info:
        make_ddf("from_pandas", [3], tmp_path).imgsink.to_webdataset(
            str(tmp_path / "out"), key_column="key", max_pixels=1000, compute=True)
    assert info.value.row == 0 and info.value.key == "img00000"
    assert "64x48 = 3,072 pixels, more than max_pixels=1,000" in str(info.value)
    out = tmp_path / "ok"
    make_ddf("from_pandas", [2], tmp_path).imgsink.to_webdataset(str(out), key_column="key", max_pixels=4000,
                                                                compute=True)
    index_options = json.loads((out / "_index.json").read_text())["jobs"][0]["options"]
    assert index_options["max_pixels"] == 4000


def test_checksums_are_plain_sha256_of_the_files(intact):
    index = json.loads((intact / "_index.json").read_text())
    for entry in index["shardlist"]:
        tar = (intact / entry["url"]).read_bytes()
        parquet = (intact / metadata_of(entry["url"])).read_bytes()
        assert entry["sha256"] == hashlib.sha256(tar).hexdigest() and entry["filesize"] == len(tar)
        assert entry["parquet_sha256"] == hashlib.sha256(parquet).hexdigest()
        table = pq.read_table(io.BytesIO(parquet))
        for row in table.to_pylist():  # each sample's checksum covers all of its members' tar bytes
            start, size = row["sample_offset"], row["sample_size"]
            assert row["sample_xxh3_64"] == xxhash.xxh3_64_hexdigest(tar[start:start + size])
            with tarfile.open(fileobj=io.BytesIO(tar[start:start + size] + bytes(1024))) as tf:
                names = [m.name for m in tf.getmembers()]
            assert names == [f"{row['key']}.{e}" for e in ("jpg", "txt", "cls", "json")]


def test_parquet_pages_carry_crcs_that_verify_checks(out):
    path = out / metadata_of(SHARD)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    _flip(path, column.data_page_offset + column.total_compressed_size - 4)  # in the data of the first page
    problems = _problems(out)
    assert any(p.startswith(f"{metadata_of(SHARD)}: is not a readable Parquet file") for p in problems), problems


def test_empty_and_missing_captions_verify_as_intact(tmp_path):
    pdf = make_frame(4)
    pdf["caption"] = pd.Series(["", None, "x", ""], dtype=object)
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=1)
    out = tmp_path / "out"
    ddf.imgsink.to_webdataset(str(out), key_column="key", text_column="caption", compute=True)
    report = verify_dataset(str(out))
    assert report.ok, report.problems


def test_a_header_with_a_negative_size_is_damage_not_a_crash(out):
    member = _members(out / SHARD)["img00004.txt"]
    data = bytearray((out / SHARD).read_bytes())
    header = bytearray(data[member.offset: member.offset + 512])
    header[124:136] = b"-0000000001\0"
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    data[member.offset: member.offset + 512] = header
    (out / SHARD).write_bytes(bytes(data))
    problems = _problems(out)
    assert any("its size field is not a number" in p for p in problems), problems


def test_clean_of_a_missing_directory_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dask_imgsink.cli", "clean", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.fixture(scope="module")
def with_skipped(tmp_path_factory):
    """A dataset with an ``_errors.jsonl``: rows 4 and 7 are left out."""
    out = tmp_path_factory.mktemp("skipped") / "out"
    pdf = make_frame(9)
    pdf.at[4, "image"] = np.zeros((0, 4, 3), np.uint8)
    pdf.at[7, "image"] = "not an image"
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=2, sort=False)
    ddf.imgsink.to_webdataset(str(out), key_column="key", text_column="caption", label_column="label",
                              images_per_tar=3, on_error="skip", compute=True)
    return out


def _positions(size: int, count: int = 14) -> list[int]:
    """The first and last byte and ``count - 2`` spread between them (a varying stride)."""
    return sorted({0, size - 1, *(round(size * (i * i + 1) / (count * count)) for i in range(count - 2))})


# what may also name a changed file: _SUCCESS vouches for the index and the errors file
_VOUCHED = {"_SUCCESS": {"_SUCCESS", "_index.json", "_errors.jsonl"}}


def test_a_byte_changed_anywhere_but_the_card_is_found_and_its_file_named(with_skipped, tmp_path):
    """Every file of the dataset, at bytes spread over it: tar headers, data, padding and end
    blocks, Parquet, DALI index, ``_index.json``, ``_SUCCESS`` (which records the index's and
    the errors file's SHA-256) and ``_errors.jsonl``. Each change is reported, never raised,
    and the report names the changed file (or, for ``_SUCCESS``, what it vouches for)."""
    files = sorted(str(p.relative_to(with_skipped)) for p in with_skipped.rglob("*") if p.is_file())
    assert "_errors.jsonl" in files and "shard-000000.idx" in files and "metadata/shard-000000.parquet" in files
    missed = []
    for name in files:
        if name == "README.md":
            continue
        size = (with_skipped / name).stat().st_size
        for position in _positions(size):
            out = tmp_path / f"{name.replace('/', '_')}-{position}"
            shutil.copytree(with_skipped, out)
            _flip(out / name, position)
            report = verify_dataset(str(out))
            named = {p.shard for p in report.problems}
            if report.ok or not named & _VOUCHED.get(name, {name}):
                missed.append((name, position, [str(p) for p in report.problems]))
            shutil.rmtree(out)
    assert missed == []


def test_the_card_is_yours_to_edit(with_skipped, tmp_path):
    """README.md is the dataset card, documentation that Hugging Face users edit: verify leaves it alone."""
    out = tmp_path / "out"
    shutil.copytree(with_skipped, out)
    (out / "README.md").write_text((out / "README.md").read_text() + "\nLicense: CC-BY-4.0\n")
    assert verify_dataset(str(out)).ok
