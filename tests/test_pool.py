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


def _run_callers(callers: int, threads: int, items: int = 20) -> tuple[int, set[int], set[int]]:
    """``callers`` threads each map ``items`` items at once; returns the most run at once, the threads that
    ran items while every caller still had items to give, and the callers' threads."""
    running, most, seen_threads, lock = [0], [0], set(), threading.Lock()
    all_entered = threading.Barrier(callers)
    exhausted = threading.Event()  # set when a caller's items run out, before it leaves map_ordered

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if not exhausted.is_set():
            seen_threads.add(threading.get_ident())
        time.sleep(0.001)
        with lock:
            running[0] -= 1
        if i == 3:
            raise ValueError("three")
        return i

    def after_all_entered(n):
        all_entered.wait()  # every caller is inside map_ordered before its first item is asked for
        yield from range(n)
        exhausted.set()  # from here the others may be fewer than the threads, and use the pool

    results = {}

    def consume(name):
        futures = list(map_ordered(work, after_all_entered(items), threads=threads))
        results[name] = [f.exception() is not None for f in futures], [f.result() for f in futures if not f.exception()]

    threads_ = [threading.Thread(target=consume, args=(n,)) for n in range(callers)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    for errors, values in results.values():
        assert errors.index(True) == 3 and values == [i for i in range(items) if i != 3]
    return most[0], seen_threads, {t.ident for t in threads_}


@pytest.mark.parametrize("callers, threads", [(2, 1), (2, 2), (3, 2)])
def test_enough_callers_run_their_items_on_their_own_threads_at_most_threads_at_once(callers, threads):
    """No hand-off per image when the callers alone fill the encoder slots (a one-thread worker; N write
    tasks on N threads), and still never more than ``threads`` items at once in the process."""
    most, seen, caller_threads = _run_callers(callers, threads)
    assert most <= threads
    assert seen <= caller_threads  # no pool thread ran an item


def test_fewer_callers_than_threads_share_the_pool():
    """One partition alone (or the engine-free stage) still encodes on every thread."""
    most, seen, caller_threads = _run_callers(1, 3, items=60)
    assert not seen & caller_threads and len(seen) >= 2
    assert most <= 3


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


def test_a_write_that_fails_midway_is_no_longer_counted_as_an_encoding_caller(tmp_path):
    """The traceback of a failed write holds write_rows' frame (Dask keeps it; so does an interactive
    session). A map_ordered left open there would count as a caller for as long as that lives, and
    make the process's next lone caller encode on its own thread alone."""
    import fsspec
    from helpers import make_image

    from dask_imgsink.core import pool
    from dask_imgsink.core.encode import EncodeOptions
    from dask_imgsink.core.writer import Rows, ShardTarget, write_rows
    from dask_imgsink.errors import BadRowError

    def target(i):
        return ShardTarget(str(tmp_path / f"s{i}.tar"), str(tmp_path / f"s{i}.parquet"), f"s{i}.tar")

    images = [make_image(i, 16, 16) for i in range(30)] + [object()] + [make_image(0, 16, 16)] * 30
    rows = Rows(images=images, keys=[f"k{i}" for i in range(len(images))], columns={"image": "image"})
    with pytest.raises(BadRowError) as caught:
        write_rows(rows, fs=fsspec.filesystem("file"), target_for=target, images_per_tar=100,
                   options=EncodeOptions(), encode_threads=2, partition=4)
    assert caught.value.__traceback__ is not None and caught.value.row == 30  # the frames are still held
    assert pool.per_process(("callers", 2), lambda: None).count == 0
