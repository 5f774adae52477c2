"""Object stores: commit, lock (a conditional PUT), verify and clean on a real S3 API server on loopback."""

from __future__ import annotations

import json

import fsspec

import pytest
from helpers import frame_ddf, race_for_the_lock, shard_names, staged_job

import dask_imgsink  # noqa: F401
from dask_imgsink import OutputLockedError, verify_dataset
from dask_imgsink.cli import main
from dask_imgsink.job.lock import LockInfo, ProcessId


def _keys(fs, url) -> list[str]:
    root = url.removeprefix("s3://")
    return sorted(p[len(root) + 1:] for p in fs.find(root))


def _cli_options(options) -> list[str]:
    return ["--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}",
            "--storage-option", f"client_kwargs.endpoint_url={options['client_kwargs']['endpoint_url']}",
            "--storage-option", "client_kwargs.region_name=us-east-1"]


def test_a_round_trip_on_the_cluster_leaves_only_the_dataset(s3, client):
    prefix, options, fs = s3
    url = f"{prefix}/out"
    tasks = frame_ddf(10, 0, npartitions=3).imgsink.to_webdataset(
        url, key_column="key", text_column="caption", images_per_tar=4, storage_options=options, compute=True)
    assert [t.data[0] for t in tasks] == [f"{url}/shard-00000{i}.tar" for i in range(3)]
    assert _keys(fs, url) == ["README.md", "_SUCCESS", "_index.json"] + shard_names(
        *(f"shard-00000{i}" for i in range(3)))
    report = verify_dataset(url, storage_options=options, client=client, decode=True)
    assert report.ok and report.images == 10, report.problems
    frame_ddf(3, 100).imgsink.to_webdataset(url, key_column="key", text_column="caption", images_per_tar=4,
                                            storage_options=options, mode="append", compute=True)
    index = json.loads(fs.cat_file(f"{url.removeprefix('s3://')}/_index.json"))
    assert index["num_samples"] == 13 and len(index["shardlist"]) == 4
    assert not any(k.startswith(".imgsink") for k in _keys(fs, url))


def test_the_lock_is_a_conditional_put_two_racing_jobs_cannot_share(s3, monkeypatch):
    prefix, options, fs = s3
    url = f"{prefix}/race"
    inputs = {"a": frame_ddf(6, 0), "b": frame_ddf(6, 500)}
    outcome = race_for_the_lock(monkeypatch, {
        name: (lambda ddf=ddf: ddf.imgsink.to_webdataset(url, key_column="key", storage_options=options,
                                                          mode="append", compute=True))
        for name, ddf in inputs.items()})
    errors = [v for v in outcome.values() if isinstance(v, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], OutputLockedError), outcome
    assert verify_dataset(url, storage_options=options).ok


def test_a_foreign_lock_on_s3_is_refused_then_broken_on_purpose(s3, capsys):
    prefix, options, fs = s3
    url = f"{prefix}/held"
    root = url.removeprefix("s3://")
    info = LockInfo(job_id="f" * 32, run_id="b" * 32, token="t", mode="error", created="2026-01-01T00:00:00",
                    process=ProcessId("another-host", "boot", "pid:[1]", 7, 1))
    fs.pipe_file(f"{root}/.imgsink/lock.json", info.to_bytes())
    fs.pipe_file(f"{root}/.imgsink/jobs/{'f' * 32}/write-000000-x/run-000000.tar.part", b"x" * 10)
    with pytest.raises(OutputLockedError, match="another-host"):
        frame_ddf(4, 0).imgsink.to_webdataset(url, key_column="key", storage_options=options)
    assert main(["clean", url, *_cli_options(options)]) == 1
    assert main(["clean", url, "--break-lock", *_cli_options(options)]) == 0
    assert _keys(fs, url) == []
    frame_ddf(4, 0).imgsink.to_webdataset(url, key_column="key", storage_options=options, compute=True)
    assert main(["verify", url, "--scheduler", "threads", *_cli_options(options)]) == 0
    capsys.readouterr()


def test_verify_finds_a_flipped_byte_in_an_object(s3, capsys):
    prefix, options, fs = s3
    url = f"{prefix}/damaged"
    frame_ddf(6, 0).imgsink.to_webdataset(url, key_column="key", images_per_tar=3, storage_options=options,
                                          compute=True)
    path = f"{url.removeprefix('s3://')}/shard-000001.tar"
    data = bytearray(fs.cat_file(path))
    data[1000] ^= 1
    fs.pipe_file(path, bytes(data))
    assert main(["verify", url, "--scheduler", "threads", *_cli_options(options)]) == 1
    printed = capsys.readouterr().out
    assert "shard-000001.tar: does not match the SHA-256 the index records" in printed
    assert "shard-000001.tar: img00003.jpg: differs from what was written" in printed


def test_exact_packing_uploads_each_byte_once_and_reads_none_back(counted_s3):
    """Runs stay in memory as task results: the dataset's bytes are uploaded once (to staging, then
    copied by the server), and nothing of them is downloaded (counted at the server)."""
    prefix, options, server = counted_s3
    url = f"{prefix}/once"
    ddf = frame_ddf(120, 0, npartitions=7)
    ddf.imgsink.to_webdataset(url, key_column="key", images_per_tar=16, text_column="caption",
                              storage_options=options, compute=True, compute_kwargs={"scheduler": "threads"})
    counts = server.counts()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    dataset_bytes = sum(info["size"] for info in fs.find(url, detail=True).values())
    assert counts["bytes_up"] <= 1.05 * dataset_bytes, (counts, dataset_bytes)
    assert counts["bytes_down"] <= 0.05 * dataset_bytes, (counts, dataset_bytes)
    assert verify_dataset(url, storage_options=options).ok


def test_the_commit_publishes_each_shard_with_three_requests_at_once(counted_s3):
    """100 shards (tar, Parquet and DALI index each): one CopyObject per file, many in flight at once
    (counted at the server), and a few requests for the whole commit (journal, index, card, _SUCCESS,
    lock, staging removal), most of them sent together: each request the server gets while it holds
    no other costs the commit a whole round trip."""
    prefix, options, server = counted_s3
    url = f"{prefix}/many"
    commit = staged_job(frame_ddf(100, 0, npartitions=4), url, key_column="key", images_per_tar=1,
                        storage_options=options)
    server.reset()
    tasks = commit()
    counts = server.counts()
    assert len(tasks) == 100
    assert counts["requests"].get("CopyObject") == 3 * 100, counts
    assert counts["total"] - 3 * 100 <= 20, counts  # nothing else scales with the shards
    assert counts["requests"].get("HeadObject", 0) <= 2, counts  # no HEAD before a GET or a LIST
    waited_alone = [r for r in counts["alone"] if not r.startswith("CopyObject")]
    assert len(waited_alone) <= 14, waited_alone  # 35 when every step waited for the one before
    assert counts["most_in_flight"] > 10, counts  # more than botocore's default pool of 10 connections
    assert verify_dataset(url, storage_options=options).ok


def test_a_commit_of_many_files_spreads_its_copies_over_every_worker(counted_s3, client):
    """On a cluster, the commit's CopyObjects are sent from both worker processes (botocore's CPU per
    request, not the store, bounds a commit of many shards from one process); still one per file."""
    import dask
    from distributed import get_task_stream

    prefix, options, server = counted_s3
    url = f"{prefix}/spread"
    with dask.config.set({"imgsink.commit-spread-files": 4}):  # read where the graph is built
        job = frame_ddf(12, 0, npartitions=3).imgsink.to_webdataset(url, key_column="key", images_per_tar=1,
                                                                   storage_options=options)
    with get_task_stream(client) as stream:
        tasks = job.compute()
    shares = [t for t in stream.data if str(t["key"]).startswith("imgsink-publish-share")]
    assert len(tasks) == 12 and len(shares) == 2
    assert len({t["worker"] for t in shares}) == 2, shares
    assert server.counts()["requests"].get("CopyObject") == 3 * 12
    assert verify_dataset(url, storage_options=options).ok


def test_a_commit_with_spreading_turned_off_copies_from_its_own_process(counted_s3, client):
    import dask
    from distributed import get_task_stream

    prefix, options, server = counted_s3
    with dask.config.set({"imgsink.commit-spread-files": None}):
        job = frame_ddf(12, 0, npartitions=3).imgsink.to_webdataset(f"{prefix}/one", key_column="key",
                                                                   images_per_tar=1, storage_options=options)
    with get_task_stream(client) as stream:
        job.compute()
    assert not [t for t in stream.data if str(t["key"]).startswith("imgsink-publish-share")]
    assert server.counts()["requests"].get("CopyObject") == 3 * 12


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "64"])
def test_a_bad_spread_setting_is_refused_where_the_graph_is_built(tmp_path, value):
    import dask

    with dask.config.set({"imgsink.commit-spread-files": value}), \
            pytest.raises(ValueError, match="imgsink.commit-spread-files"):
        frame_ddf(2, 0).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key")


def test_a_commit_spreads_over_at_most_eight_workers_each_with_enough_files():
    """Eight processes send about as many CopyObjects a second as S3 takes on one prefix (3,500)."""
    from dask_imgsink.job.spread import shares_for

    workers = [f"tcp://w{i:03d}" for i in range(100)]
    moves = list(range(30_000))
    shares = shares_for(moves, workers, 128)
    assert [w for w, _ in shares] == workers[:8]
    assert sorted(m for _, share in shares for m in share) == moves  # each file once
    assert {len(share) for _, share in shares} == {3750}
    assert len(shares_for(list(range(300)), workers, 128)) == 2  # 128 files a share at least
    assert shares_for(list(range(255)), workers, 128) == []
    assert shares_for(moves, workers[:1], 128) == [] and shares_for(moves, workers, None) == []


def test_a_commit_through_obstore_spreads_over_at_most_two_workers():
    """obstore sends about 1,300 copies a second from one process: two stay below S3's 3,500 a second on
    one prefix. A filesystem whose copies stay on s3fs (a setting obstore would not send, or obstore
    turned off) still spreads over eight."""
    import s3fs

    from dask_imgsink.job.spread import MAX_SHARES, MAX_SHARES_OBSTORE, most_shares, shares_for

    plain = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
             "skip_instance_cache": True}
    assert (MAX_SHARES_OBSTORE, MAX_SHARES) == (2, 8)
    assert most_shares(s3fs.S3FileSystem(**plain), fast=True) == 2
    assert most_shares(s3fs.S3FileSystem(**plain), fast=False) == 8
    assert most_shares(s3fs.S3FileSystem(**plain, requester_pays=True), fast=True) == 8
    workers = [f"tcp://w{i:03d}" for i in range(100)]
    assert len(shares_for(list(range(30_000)), workers, 128, most=2)) == 2


def test_a_copy_that_fails_leaves_nothing_published_once_the_commit_has_failed(counted_s3):
    """One staged object of 80 shards is gone: its CopyObject fails while many others are in flight or
    queued. The commit fails and takes back what it published; no copy may land after that, so the
    output holds nothing (no objects, not even ones that appear a moment later)."""
    import time

    import s3fs

    prefix, options, _ = counted_s3
    url = f"{prefix}/half"
    commit = staged_job(frame_ddf(80, 0, npartitions=4), url, key_column="key", images_per_tar=1,
                        storage_options=options)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    root = url.removeprefix("s3://")
    staged = sorted(p for p in fs.find(root) if p.endswith("shard-000000.parquet.part"))
    assert len(staged) == 1, staged
    fs.rm(staged[0])
    with pytest.raises(FileNotFoundError, match="staging"):
        commit()
    time.sleep(1.0)  # a copy still in flight when the commit returned would land now
    assert fs.find(root) == [], fs.find(root)[:10]


def _delay_shares_without(missing: str, seconds: float):
    """On a worker: a share of the commit's copies that does not hold ``missing`` copies one file every
    ``seconds`` (a slow worker), so the share that fails ends long before it. ``None`` undoes it."""
    import functools
    import time

    import dask_imgsink.job.spread as spread
    import dask_imgsink.storage as storage

    real = getattr(storage, "_real_publish_many", storage.publish_many)
    storage._real_publish_many = real
    if missing is None:
        spread.publish_many = storage.publish_many = real
        return

    @functools.wraps(real)
    def publish_many(fs, moves, fast=True):
        if any(staged.endswith(missing) for staged, _, _ in moves):
            return real(fs, moves, fast)
        for move in moves:
            time.sleep(seconds)
            real(fs, [move], fast)

    # both names: a share pickles the function by reference to dask_imgsink.storage
    spread.publish_many = storage.publish_many = publish_many


def test_a_share_that_fails_leaves_nothing_published_once_the_spread_commit_has_failed(counted_s3, client):
    """The same on a cluster, the copies spread over both workers, one share slow: the commit waits for
    every share to end before it takes back what was published, so the slow share's copies do not land
    after it. (The delay is injected into the workers' real code path; the copies are real.)"""
    import time

    import dask
    import s3fs

    prefix, options, _ = counted_s3
    url = f"{prefix}/spread-half"
    with dask.config.set({"imgsink.commit-spread-files": 4}):
        commit = staged_job(frame_ddf(40, 0, npartitions=4), url, key_column="key", images_per_tar=1,
                            storage_options=options)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    root = url.removeprefix("s3://")
    missing = "shard-000000.parquet.part"
    fs.rm([p for p in fs.find(root) if p.endswith(missing)])
    client.run(_delay_shares_without, missing, 0.03)
    try:
        with pytest.raises(FileNotFoundError, match="staging"):
            client.submit(commit, pure=False).result()
    finally:
        client.run(_delay_shares_without, None, 0)
    time.sleep(3.0)  # the slow share's copies would land by now
    assert fs.find(root) == [], fs.find(root)[:10]


# --------------------------------------------------------------------------- the commit's copies through obstore


def _copies_by_client(server) -> dict[str, int]:
    """CopyObject requests the server served, by client (the first word of the User-Agent)."""
    return {client: ops["CopyObject"] for client, ops in server.counts()["by_client"].items() if "CopyObject" in ops}


def test_the_commit_copies_through_obstore_when_it_is_installed(counted_s3, client):
    """Every CopyObject of the commit comes from obstore (its User-Agent, counted at the server), on the
    cluster and spread over both workers; every other request still from s3fs; the dataset verifies."""
    import dask

    prefix, options, server = counted_s3
    url = f"{prefix}/obstore"
    with dask.config.set({"imgsink.commit-spread-files": 4}):
        frame_ddf(12, 0, npartitions=3).imgsink.to_webdataset(url, key_column="key", images_per_tar=1,
                                                              storage_options=options, compute=True)
    assert _copies_by_client(server) == {"dask-imgsink": 3 * 12}
    assert set(server.counts()["by_client"]["dask-imgsink"]) == {"CopyObject"}  # the rest from s3fs
    assert verify_dataset(url, storage_options=options).ok


def test_the_commit_copies_through_s3fs_when_obstore_is_turned_off(counted_s3):
    import dask

    prefix, options, server = counted_s3
    with dask.config.set({"imgsink.commit-obstore": False}):
        job = frame_ddf(6, 0, npartitions=2).imgsink.to_webdataset(f"{prefix}/off", key_column="key",
                                                                  images_per_tar=1, storage_options=options)
    job.compute()
    assert _copies_by_client(server) == {"aiobotocore": 3 * 6}


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_bad_obstore_setting_is_refused_where_the_graph_is_built(tmp_path, value):
    import dask

    with dask.config.set({"imgsink.commit-obstore": value}), pytest.raises(ValueError, match="commit-obstore"):
        frame_ddf(2, 0).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key")


def test_a_store_that_refuses_obstore_still_gets_the_dataset_through_s3fs(counted_s3, caplog):
    """The server answers every obstore request with 403 AccessDenied (as a store might that obstore
    cannot talk to): obstore's first copy fails, no other is sent through it, every file is copied
    through s3fs, the job succeeds with the same dataset, and a warning names obstore's error."""
    prefix, options, server = counted_s3
    url = f"{prefix}/refused"
    server.deny("dask-imgsink")
    with caplog.at_level("WARNING", logger="dask_imgsink.s3copy"):
        tasks = frame_ddf(8, 0, npartitions=2).imgsink.to_webdataset(url, key_column="key", images_per_tar=2,
                                                                     storage_options=options, compute=True)
    counts = server.counts()
    assert len(tasks) == 4 and counts["denied"] == 1
    assert _copies_by_client(server) == {"aiobotocore": 3 * 4}
    assert "obstore failed 12 of 12 copies (PermissionDeniedError" in caplog.text
    assert verify_dataset(url, storage_options=options).ok


@pytest.mark.parametrize("setting", [{"s3_additional_kwargs": {"StorageClass": "STANDARD"}},
                                     {"requester_pays": True}, {"anon": True},
                                     {"client_kwargs": {"verify": False}},
                                     {"config_kwargs": {"s3": {"addressing_style": "virtual"}}}])
def test_settings_obstore_would_not_send_keep_the_copies_on_s3fs(setting):
    """Encryption, ACLs, requester-pays, anonymous access, TLS and addressing settings change the
    CopyObject request; obstore would not send them, so those filesystems copy through s3fs."""
    import s3fs

    from dask_imgsink.s3copy import unsupported_setting

    plain = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "x"},
             "config_kwargs": {"max_pool_connections": 64}, "skip_instance_cache": True}
    assert unsupported_setting(s3fs.S3FileSystem(**plain)) is None
    options = {**plain, **setting}
    name = unsupported_setting(s3fs.S3FileSystem(**options))
    assert name is not None and name.split("[")[0] in setting


def test_objects_too_large_for_one_copy_request_are_left_to_s3fs(counted_s3):
    """CopyObject copies at most 5 GiB; a file declared larger is not sent to obstore (s3fs copies such
    files in parts). The small ones are copied by obstore and are at their final names."""
    import s3fs

    from dask_imgsink.s3copy import copy_fast

    prefix, options, server = counted_s3
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    root = prefix.removeprefix("s3://")
    fs.pipe({f"{root}/staged/{name}": b"x" * 10 for name in ("a", "b", "c")})
    moves = [(f"{root}/staged/a", f"{root}/final/a", 10), (f"{root}/staged/b", f"{root}/final/b", 6 * 2**30),
             (f"{root}/staged/c", f"{root}/final/c", 10)]
    server.reset()
    assert copy_fast(fs, moves) == [moves[1]]
    assert sorted(fs.ls(f"{root}/final")) == [f"{root}/final/a", f"{root}/final/c"]
    assert _copies_by_client(server) == {"dask-imgsink": 2}


def test_obstore_copies_keys_with_any_character_to_the_same_key_or_leaves_them_to_s3fs(counted_s3):
    """obstore parses object keys into its own paths: a key it cannot parse (an empty segment, a control
    character) must be left to s3fs, and every other key must land exactly where s3fs would put it,
    never at a key encoded differently. Output directories are the user's, so any character can occur."""
    import s3fs

    from dask_imgsink.storage import publish_many

    prefix, options, server = counted_s3
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    bucket = prefix.removeprefix("s3://")
    roots = ["with space", "a+b=c&d", "pct%41x", "ünï 😀", "q?x#y", "semi;x,y", "star*x", "back\\x", "dbl//slash",
             "tab\tx"]
    moves = [(f"{bucket}/{i}/{root}/f.part", f"{bucket}/{i}/{root}/final/f", 3) for i, root in enumerate(roots)]
    fs.pipe({staged: staged.encode() for staged, _, _ in moves})
    server.reset()
    publish_many(fs, moves)
    for staged, final, _ in moves:
        assert fs.cat_file(final) == staged.encode(), final
    assert sorted(fs.find(bucket)) == sorted(p for move in moves for p in move[:2])
    copies = _copies_by_client(server)
    assert copies["dask-imgsink"] >= 7 and sum(copies.values()) == len(roots), copies
