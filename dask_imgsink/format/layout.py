"""What a dataset directory holds, by name: shards, index files, and the hidden work area.

The one place that says where every file of a dataset lives, so the writer,
the commit, ``verify`` and ``clean`` can never disagree::

    out/
      shard-000000.tar, shard-000000.parquet, ...   the shards
      _index.json, README.md, _SUCCESS, _errors.parquet
      .imgsink/                                      present only while a job runs
        lock.json                                    the owning job (create-if-absent)
        jobs/<job id>/...                            that job's staged files

Staged files sit in a dot folder, which Arrow, Hugging Face ``datasets`` and
Spark skip, and end in ``.part`` rather than ``.parquet``, because
``dd.read_parquet(out)`` reads every ``*.parquet``/``*.parq``/``*.pq`` below
``out``, hidden folders included.
"""

from __future__ import annotations

INDEX_FILE = "_index.json"
SUCCESS_FILE = "_SUCCESS"
ERRORS_FILE = "_errors.parquet"
CARD_FILE = "README.md"
