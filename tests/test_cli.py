"""The dask-imgsink command, run as a user runs it: demo on a real local cluster, write from every
kind of input, verify, info, clean; usage errors exit 2 without a traceback."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import sys

from dask_imgsink.cli import main


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dask_imgsink.cli", *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_help_explains_the_demo_options():
    proc = _run("demo", "--help")
    assert proc.returncode == 0
    for option in ("--images", "--partitions", "--images-per-tar", "--format", "--packing", "--mode"):
        assert option in proc.stdout


def test_demo_writes_reads_back_and_summarises(tmp_path):
    import socket

    out = tmp_path / "demo"
    with socket.socket() as busy:  # another cluster's dashboard holds the default port
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 8787))
            busy.listen()
        except OSError:
            pass  # something else holds it already: the same situation
        proc = _run("demo", str(out), "--images", "240", "--partitions", "6", "--size", "64",
                    "--images-per-tar", "50")
    assert proc.returncode == 0, proc.stderr
    assert "8787" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "read back:" in proc.stdout and "all consistent" in proc.stdout
    index = json.loads((out / "_index.json").read_text())
    kept = index["totals"]["images"]
    assert 100 < kept < 240  # the demo filters
    assert [e["nsamples"] for e in index["shardlist"]][:-1] == [50] * (len(index["shardlist"]) - 1)
    # a second run over its own earlier output replaces it
    again = _run("demo", str(out), "--images", "60", "--partitions", "2", "--size", "32")
    assert again.returncode == 0, again.stderr


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    proc = _run("demo", str(tmp_path), "--images", "10", "--partitions", "1", "--size", "16")
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_verify_and_info(tmp_path, capsys):
    from helpers import make_ddf

    import dask_imgsink  # noqa: F401

    out = tmp_path / "out"
    make_ddf("from_pandas", [7], tmp_path).imgsink.to_webdataset(str(out), key_column="key",
                                                                images_per_tar=3, compute=True)
    assert main(["verify", str(out), "--decode"]) == 0
    assert "3 shards, 7 images" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 7
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:-2048] + bytes(2048))
    (out / "_SUCCESS").unlink()
    assert main(["verify", str(out)]) == 1
    assert "INCOMPLETE" in capsys.readouterr().out


def test_info_of_a_dataset_whose_first_job_wrote_no_shard(tmp_path, capsys):
    from helpers import frame_ddf

    out = tmp_path / "out"
    ddf = frame_ddf(4, 0)
    ddf[ddf["key"] == "none"].imgsink.to_webdataset(str(out), key_column="key", compute=True)
    frame_ddf(4, 10).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=3, mode="append",
                                          compute=True)
    assert main(["info", str(out)]) == 0
    jobs = capsys.readouterr().out.split("written by 2 jobs:")[1].splitlines()[1:]
    assert jobs[0].endswith("0 images, 0 skipped, no shard") and jobs[1].endswith("4 images, 0 skipped, shards 0-1")


def test_version_and_every_help_is_plain_text():
    from dask_imgsink import __version__

    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"dask-imgsink {__version__}"
    for command in ([], ["write"], ["demo"], ["verify"], ["info"], ["clean"]):
        proc = _run(*command, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith("usage: dask-imgsink")
        assert "`" not in proc.stdout, proc.stdout  # no reST markup


@pytest.mark.parametrize("args", [
    ["demo", "OUT", "--partitions", "0"],
    ["demo", "OUT", "--size", "0"],
    ["demo", "OUT", "--images", "-5"],
    ["demo", "OUT", "--images-per-tar", "many"],
    ["demo", "OUT", "--min-aesthetic", "11"],
    ["write", "NOWHERE", "OUT"],
    ["write", "IMAGES", "OUT", "--images-per-tar", "0"],
    ["write", "IMAGES", "OUT", "--max-shard-bytes", "lots"],
    ["write", "IMAGES", "OUT", "--quality", "101"],
    ["write", "IMAGES", "OUT", "--filter", "nosuchcolumn > 3"],
    ["write", "IMAGES", "OUT", "--filter", "key >"],
    ["write", "IMAGES", "OUT", "--storage-option", "novalue"],
    ["write", "IMAGES", "OUT", "--scheduler", "tcp://127.0.0.1:9"],
    ["write", "IMAGES", "OUT", "--key-column", "nope"],
    ["write", "IMAGES", "OUT", "--columns", "nope"],
    ["write", "IMAGES", "OUT", "--filter", "key > 5"],
    ["info", "IMAGES"],
    ["info", "AFILE"],
    ["verify", "NOWHERE"],
    ["verify", "IMAGES", "--decode", "--max-pixels", "0"],
    ["frobnicate"],
])
def test_usage_errors_exit_2_with_a_message_and_no_traceback(tmp_path, args):
    images = image_folder(tmp_path / "images", 3)
    (tmp_path / "afile").write_text("not a dataset")
    args = [{"OUT": str(tmp_path / "out"), "NOWHERE": str(tmp_path / "nowhere"), "IMAGES": str(images),
             "AFILE": str(tmp_path / "afile")}.get(a, a) for a in args]
    # an unreachable scheduler is given up after Dask's connect timeout: 3 s here, not the default 30
    proc = _run(*args, env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"})
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def image_folder(folder, n: int, names=None):
    """``n`` small JPEG/PNG files (every third in a subfolder, names with spaces)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n)
    for i, name in enumerate(names or [f"{'sub/' if i % 3 == 0 else ''}pic {i}.{'png' if i % 2 else 'jpg'}"
                                       for i in range(n)]):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG" if name.endswith("png")
                                                                               else "JPEG")
        path.write_bytes(buf.getvalue())
    return folder


def test_write_a_folder_of_images_passes_bytes_through_with_keys_from_paths(tmp_path):
    from dask_imgsink import read_webdataset
    from dask_imgsink.cli.inputs import key_for_path

    images = image_folder(tmp_path / "images", 7)
    out = tmp_path / "out"
    proc = _run("write", str(images), str(out), "--images-per-tar", "3", "--scheduler", "threads")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 shards, 7 images" in proc.stdout and "100%" in proc.stderr  # the progress bar
    frame = read_webdataset(str(out)).compute(scheduler="sync")
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.*"))
    assert list(frame["path"]) == files
    assert list(frame["key"]) == [key_for_path(f) for f in files]
    assert frame["key"].iloc[0] == "pic~201"
    assert [bytes(b) for b in frame["image"]] == [(images / f).read_bytes() for f in files]
    assert list(frame["format"]) == ["jpeg" if f.endswith("jpg") else "png" for f in files]


@pytest.mark.parametrize("paths", [["a/b.jpg", "a~2Fb.jpg", "a_b.jpg", "a b.jpg", "a~20b.jpg", "é.jpg"]])
def test_keys_from_paths_never_collide_and_are_valid_keys(paths):
    from dask_imgsink.cli.inputs import key_for_path
    from dask_imgsink.core.keys import check_key

    keys = [key_for_path(p) for p in paths]
    assert len(set(keys)) == len(keys)
    assert [check_key(k) for k in keys] == keys


def test_write_refuses_files_that_differ_only_in_extension(tmp_path):
    images = image_folder(tmp_path / "images", 2, names=["cat.jpg", "cat.png"])
    proc = _run("write", str(images), str(tmp_path / "out"), "--scheduler", "threads")
    assert proc.returncode == 2 and "'cat.jpg' and 'cat.png'" in proc.stderr and "Traceback" not in proc.stderr


def test_write_parquet_with_image_structs_filter_and_byte_cap_on_a_cluster(cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import png_bytes, make_image

    from dask_imgsink import read_webdataset

    source = tmp_path / "scored"
    source.mkdir()
    images = [png_bytes(make_image(i)) for i in range(24)]
    table = pa.table({
        "id": [f"s{i:03d}" for i in range(24)],
        "picture": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],
                            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "aesthetic": [i / 4 for i in range(24)],
        "caption": [f"photo {i}" for i in range(24)],
    })
    pq.write_table(table.slice(0, 12), source / "part-0.parquet")
    pq.write_table(table.slice(12), source / "part-1.parquet")
    out = tmp_path / "out"
    cap = 20 * 1024  # two tar records: a few samples per shard
    proc = _run("write", str(source), str(out), "--key-column", "id", "--text-column", "caption",
                "--filter", "aesthetic >= 2", "--max-shard-bytes", str(cap), "--images-per-tar", "100",
                "--scheduler", cluster.scheduler_address)
    assert proc.returncode == 0, proc.stderr
    frame = read_webdataset(str(out)).compute(scheduler="sync")
    assert list(frame["key"]) == [f"s{i:03d}" for i in range(8, 24)]
    assert [bytes(b) for b in frame["image"]] == images[8:]
    index = json.loads((out / "_index.json").read_text())
    assert all(e["filesize"] <= cap for e in index["shardlist"]) and len(index["shardlist"]) > 1
    assert frame["aesthetic"].dtype.kind == "f" and list(frame["caption"])[:1] == ["photo 8"]


def test_write_reshards_a_dataset_keeping_keys_bytes_and_text_members(tmp_path):
    from helpers import frame_ddf

    from dask_imgsink import read_webdataset

    first = tmp_path / "first"
    frame_ddf(30, 0, npartitions=3).imgsink.to_webdataset(str(first), key_column="key", text_column="caption",
                                                          images_per_tar=8, compute=True)
    out = tmp_path / "second"
    proc = _run("write", str(first), str(out), "--images-per-tar", "5", "--filter", "score >= 5",
                "--scheduler", "threads", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    before = read_webdataset(str(first)).compute(scheduler="sync")
    before = before[before.score >= 5]
    after = read_webdataset(str(out)).compute(scheduler="sync")
    assert list(after["key"]) == list(before["key"])
    assert list(after["sample_xxh3_64"]) == list(before["sample_xxh3_64"])  # .txt members included
    assert main(["verify", str(out), "--scheduler", "threads"]) == 0


def test_write_of_a_dataset_whose_jobs_wrote_different_text_and_label_columns_asks_for_the_rule(tmp_path):
    """The first job wrote captions as .txt, the second labels as .cls (captions only in key.json): one
    rule for every sample would add or drop members, so the command asks for it; given, it applies."""
    import dask
    import dask.dataframe as dd
    import pandas as pd
    from helpers import make_frame

    from dask_imgsink import read_webdataset

    first, out = tmp_path / "first", tmp_path / "second"
    one, two = make_frame(6), make_frame(6, start=100)
    two["label"] = pd.array([1, None, 3, 4, None, 6], dtype="Int64")
    with dask.config.set({"dataframe.convert-string": False}):
        dd.from_pandas(one, npartitions=2).imgsink.to_webdataset(
            str(first), key_column="key", text_column="caption", images_per_tar=4, compute=True)
        dd.from_pandas(two, npartitions=2).imgsink.to_webdataset(
            str(first), key_column="key", label_column="label", images_per_tar=4, mode="append", compute=True)
    proc = _run("write", str(first), str(out), "--scheduler", "threads", "--no-progress")
    assert proc.returncode == 2 and "different columns" in proc.stderr and "--text-column" in proc.stderr
    assert not out.exists()
    proc = _run("write", str(first), str(out), "--text-column", "caption", "--scheduler", "threads", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    after = read_webdataset(str(out)).compute(scheduler="sync")
    assert len(after) == 12 and main(["verify", str(out), "--scheduler", "threads"]) == 0
    index = json.loads((out / "_index.json").read_text())
    assert [(j["options"]["text_column"], j["options"]["label_column"]) for j in index["jobs"]] == [("caption", None)]


def test_write_refuses_an_image_column_for_a_dataset_input(tmp_path):
    from helpers import frame_ddf

    first = tmp_path / "first"
    frame_ddf(4, 0, npartitions=1).imgsink.to_webdataset(str(first), key_column="key", compute=True)
    proc = _run("write", str(first), str(tmp_path / "out"), "--image-column", "caption", "--scheduler", "sync")
    assert proc.returncode == 2 and "leave out --image-column caption" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_write_into_a_non_empty_directory_fails_with_exit_1_and_keeps_it(tmp_path):
    images = image_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    proc = _run("write", str(images), str(out), "--scheduler", "threads")
    assert proc.returncode == 1 and "not empty" in proc.stderr and "Traceback" not in proc.stderr
    # what the directory holds does not suit the mode: the output's state, not a usage error
    proc = _run("write", str(images), str(out), "--mode", "overwrite", "--scheduler", "threads")
    assert proc.returncode == 1 and "also holds mine.txt" in proc.stderr and "usage:" not in proc.stderr
    assert (out / "mine.txt").read_text() == "keep me"


def test_a_file_that_cannot_be_read_is_a_bad_row_of_its_own(tmp_path):
    """A dangling link (or a file gone meanwhile) failed the whole job, under --on-error skip too."""
    images = image_folder(tmp_path / "images", 2)
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    proc = _run("write", str(images), str(out), "--scheduler", "threads", "--no-progress")
    assert proc.returncode == 1 and "key 'gone'" in proc.stderr and "missing" in proc.stderr, proc.stderr
    proc = _run("write", str(images), str(out), "--on-error", "skip", "--scheduler", "threads", "--no-progress")
    assert proc.returncode == 0 and "skipped 1 rows" in proc.stdout, proc.stderr
    assert json.loads((out / "_errors.jsonl").read_text())["key"] == "gone"


def test_skipped_rows_are_counted_by_write_and_info(tmp_path):
    images = image_folder(tmp_path / "images", 4)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    proc = _run("write", str(images), str(out), "--on-error", "skip", "--scheduler", "threads")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 shards, 4 images" in proc.stdout and "skipped 1 rows" in proc.stdout
    info = _run("info", str(out))
    assert info.returncode == 0 and "4 samples" in info.stdout and "1 rows skipped" in info.stdout
    assert "jpeg 2 (50 %), png 2 (50 %)" in info.stdout and "<= 32 px" not in info.stdout
    assert "<= 64 px  " + "#" * 40 + " 4" in info.stdout
    data = json.loads(_run("info", str(out), "--json").stdout)
    assert data["sides"][0] == {"longer_side": "<= 64", "images": 4} and data["skipped"] == 1
    assert data["jobs"][0]["images"] == 4


def test_write_a_folder_of_images_on_s3_with_storage_options(s3, tmp_path):
    prefix, options, fs = s3
    images = image_folder(tmp_path / "images", 5)
    for path in sorted(images.rglob("*.*")):
        fs.pipe_file(f"{prefix}/photos/{path.relative_to(images).as_posix()}", path.read_bytes())
    endpoint = options["client_kwargs"]["endpoint_url"]
    flags = ["--storage-option", "key=testing", "--storage-option", "secret=testing",
             "--storage-option", f"client_kwargs.endpoint_url={endpoint}",
             "--storage-option", "client_kwargs.region_name=us-east-1"]
    proc = _run("write", f"{prefix}/photos", f"{prefix}/out", "--images-per-tar", "2", "--scheduler", "threads",
                *flags)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 shards, 5 images" in proc.stdout
    assert _run("verify", f"{prefix}/out", "--scheduler", "threads", *flags).returncode == 0
    info = json.loads(_run("info", f"{prefix}/out", "--json", *flags).stdout)
    assert info["samples"] == 5 and info["formats"] == {"jpeg": 3, "png": 2}
