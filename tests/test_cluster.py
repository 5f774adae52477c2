"""The clusters our CLI and benchmarks start: their workers get our allocator setting, and no other cluster does.

Dask's nanny writes its pre-spawn variables into its own process's ``os.environ``
and keeps them, and prefers a value already there to its config; so without care
the first cluster of a process decides the setting of every later one.
"""

from __future__ import annotations

import logging
import os

from distributed import Client, LocalCluster

from dask_imgsink.cluster import MALLOC_TRIM_THRESHOLD, local_cluster

VARIABLE = "MALLOC_TRIM_THRESHOLD_"


def _workers_setting(cluster) -> set[str | None]:
    with Client(cluster, set_as_default=False) as client:
        return set(client.run(lambda: os.environ.get(VARIABLE)).values())


def _plain_cluster() -> LocalCluster:
    return LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.ERROR)


def test_ours_gets_its_setting_after_a_plain_cluster_and_leaves_the_process_as_it_was(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    with _plain_cluster() as plain:
        nanny_default = _workers_setting(plain)
    assert nanny_default == {"65536"}
    assert os.environ.get(VARIABLE) == "65536"  # what the nanny left behind in this process
    with local_cluster(n_workers=1, threads_per_worker=1) as ours:
        assert _workers_setting(ours) == {str(MALLOC_TRIM_THRESHOLD)}
    assert os.environ.get(VARIABLE) == "65536"  # ours did not change this process's value
    monkeypatch.delenv(VARIABLE)
    with local_cluster(n_workers=1, threads_per_worker=1) as ours:
        assert _workers_setting(ours) == {str(MALLOC_TRIM_THRESHOLD)}
    assert VARIABLE not in os.environ
    with _plain_cluster() as plain:
        assert _workers_setting(plain) == nanny_default  # a later plain cluster keeps Dask's default
