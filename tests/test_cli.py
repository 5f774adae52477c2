"""The dask-imgsink command: demo on a real local cluster, verify, info."""

from __future__ import annotations

import json
import subprocess
import sys

from dask_imgsink.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dask_imgsink.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_help_explains_the_demo_options():
    proc = _run("demo", "--help")
    assert proc.returncode == 0
    for option in ("--images", "--partitions", "--images-per-tar", "--format", "--packing", "--mode"):
        assert option in proc.stdout


def test_demo_writes_reads_back_and_summarises(tmp_path):
    out = tmp_path / "demo"
    proc = _run("demo", str(out), "--images", "240", "--partitions", "6", "--size", "64",
                "--images-per-tar", "50")
    assert proc.returncode == 0, proc.stderr
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
    assert main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 7
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:-2048] + bytes(2048))
    (out / "_SUCCESS").unlink()
    assert main(["verify", str(out)]) == 1
    assert "INCOMPLETE" in capsys.readouterr().out
