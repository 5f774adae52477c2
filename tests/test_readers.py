"""Output every reader accepts: Hugging Face datasets through the card, fsspec filesystems."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import fsspec
import pyarrow.parquet as pq
from helpers import make_ddf, read_dataset, shard_names

from dask_imgsink.read.verify import verify_dataset


def test_huggingface_load_dataset_reads_the_tars_through_the_card(tmp_path):
    out = tmp_path / "out"
    make_ddf("from_pandas", [6, 5], tmp_path).imgsink.to_webdataset(
        str(out), key_column="key", text_column="caption", images_per_tar=4, compute=True)
    script = textwrap.dedent(f"""
        import datasets
        ds = datasets.load_dataset({str(out)!r}, split="train", cache_dir={str(tmp_path / 'hf-cache')!r})
        print(ds.num_rows, sorted(ds.column_names), ds[0]["__key__"], ds[0]["jpg"].size, ds[0]["txt"], flush=True)
        # datasets reads through Arrow's thread pools, which can abort the interpreter
        # at exit (apache/arrow#34314); that exit is not what this test checks.
        import os
        os._exit(0)
    """)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    # images, not the Parquet metadata: the card's `configs` points at *.tar
    assert line.startswith("11 ['__key__', '__url__', 'jpg', 'json', 'txt'] img00000 (64, 48) caption number 0"), line


def test_any_fsspec_filesystem_memory(tmp_path):
    url = "memory://imgsink-test/out"
    fs = fsspec.filesystem("memory")
    make_ddf("from_pandas", [5, 4], tmp_path).imgsink.to_webdataset(
        url, key_column="key", images_per_tar=4, compute=True)  # threads: one process, one memory fs
    names = sorted(p.removeprefix("/imgsink-test/out/") for p in fs.find("/imgsink-test/out"))
    assert names == ["README.md", "_SUCCESS", "_index.json"] + shard_names(
        "shard-000000", "shard-000001", "shard-000002")
    report = verify_dataset(url, decode=True)
    assert report.ok and report.images == 9, report.problems
    index = json.loads(fs.cat("/imgsink-test/out/_index.json"))
    with tarfile.open(fileobj=io.BytesIO(fs.cat("/imgsink-test/out/shard-000000.tar"))) as tf:
        assert [m.name for m in tf.getmembers()][:2] == ["img00000.jpg", "img00000.json"]
    table = pq.read_table(io.BytesIO(fs.cat("/imgsink-test/out/metadata/shard-000002.parquet")))
    assert table.num_rows == index["shardlist"][2]["nsamples"] == 1
    fs.rm("/imgsink-test", recursive=True)


def test_non_deterministic_names_carry_a_job_token(tmp_path):
    names = []
    for name in ("a", "b"):
        make_ddf("from_pandas", [3], tmp_path).imgsink.to_webdataset(
            str(tmp_path / name), key_column="key", deterministic_name=False, compute=True)
        names.append(read_dataset(tmp_path / name)["shards"])
    assert names[0] != names[1]
    assert all(n.startswith("shard-") and n.endswith("-000000.tar") for n in names[0] + names[1])
