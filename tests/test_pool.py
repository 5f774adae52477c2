"""The encoder pool: one per process and size, results in order, a bounded window in flight."""

from __future__ import annotations

import threading
import time

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


def test_workers_size_the_pool_to_their_threads(client):
    # run as tasks, as the write tasks do; the LocalCluster's workers have 1 thread each
    futures = [client.submit(default_encode_threads, pure=False, workers=[addr])
               for addr in client.scheduler_info()["workers"]]
    assert client.gather(futures) == [1, 1]
