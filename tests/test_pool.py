"""The encoder pool: one per process and size, results in order, a bounded window in flight."""

from __future__ import annotations

import threading
import time

import pytest

from dask_imgsink.core.pool import default_encode_threads, get_encoder_pool, map_ordered


def test_one_pool_per_process_and_size():
    assert get_encoder_pool(2) is get_encoder_pool(2)
    assert get_encoder_pool(3) is not get_encoder_pool(2)
    assert get_encoder_pool() is get_encoder_pool(default_encode_threads())


def test_results_come_in_input_order_with_errors_in_place():
    def work(i):
        time.sleep(0.001 * (7 - i % 7))  # later items often finish first
        if i == 5:
            raise ValueError("five")
        return i * i

    futures = list(map_ordered(work, range(20), threads=4))
    assert [f.exception() is not None for f in futures].index(True) == 5
    assert [f.result() for i, f in enumerate(futures) if i != 5] == [i * i for i in range(20) if i != 5]


def test_at_most_window_items_are_in_flight():
    started, lock, consumed = [], threading.Lock(), [0]
    high = [0]

    def work(i):
        with lock:
            started.append(i)
            high[0] = max(high[0], len(started) - consumed[0])
        return i

    for fut in map_ordered(work, range(50), threads=2, window=3):
        time.sleep(0.002)  # a slow consumer (the tar writer)
        consumed[0] += 1
        fut.result()
    assert high[0] <= 3


def test_one_thread_runs_items_on_the_callers_thread_one_at_a_time():
    """A pool of one is the caller: no hand-off per image, and still one item at a time in the process."""
    running, most, seen_threads, lock = [0], [0], set(), threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        seen_threads.add(threading.get_ident())
        time.sleep(0.001)
        with lock:
            running[0] -= 1
        if i == 3:
            raise ValueError("three")
        return i

    results = {}

    def consume(name):
        futures = list(map_ordered(work, range(20), threads=1))
        results[name] = [f.exception() is not None for f in futures], [f.result() for f in futures if not f.exception()]

    callers = [threading.Thread(target=consume, args=(n,)) for n in "ab"]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert most[0] == 1  # two callers, never two items at once
    assert seen_threads == {t.ident for t in callers}  # no pool thread ran an item
    for errors, values in results.values():
        assert errors.index(True) == 3 and values == [i for i in range(20) if i != 3]


def test_workers_size_the_pool_to_their_threads(client):
    # run as tasks, as the write tasks do; the LocalCluster's workers have 1 thread each
    futures = [client.submit(default_encode_threads, pure=False, workers=[addr])
               for addr in client.scheduler_info()["workers"]]
    assert client.gather(futures) == [1, 1]


def _fail_if_pooled(*args, **kwargs):
    raise AssertionError("the encoder pool was used")


def test_pass_through_rows_are_prepared_without_pool_round_trips(tmp_path, monkeypatch):
    """Already-encoded bytes only need checking: done in the writing thread, with bad rows still named."""
    import fsspec
    from helpers import make_image, png_bytes

    import dask_imgsink.core.writer as writer
    from dask_imgsink.core.encode import EncodeOptions
    from dask_imgsink.core.writer import Rows, ShardTarget, write_rows

    good = png_bytes(make_image(1, 16, 16))
    rows = Rows(images=[good, good[: len(good) // 2], {"bytes": good, "path": None}],
                keys=["a", "b", "c"], columns={"image": "image"})
    fs = fsspec.filesystem("file")

    def target(i):
        return ShardTarget(str(tmp_path / f"s{i}.tar"), str(tmp_path / f"s{i}.parquet"), f"s{i}.tar")

    monkeypatch.setattr(writer, "map_ordered", _fail_if_pooled)
    shards, skipped = write_rows(rows, fs=fs, target_for=target, images_per_tar=10, options=EncodeOptions(),
                                 on_error="skip", partition=7)
    assert [s.num_images for s in shards] == [2]
    assert [(s.partition, s.row, s.key) for s in skipped] == [(7, 1, "b")] and "truncated" in skipped[0].reason
    # pixels, or bytes that need decoding, still go to the pool
    for images, options in (([make_image(2, 16, 16)], EncodeOptions()),
                            ([good], EncodeOptions(validate="decode"))):
        with pytest.raises(AssertionError, match="pool was used"):
            write_rows(Rows(images=images, keys=["x"], columns={}), fs=fs, target_for=target, images_per_tar=10,
                       options=options)
