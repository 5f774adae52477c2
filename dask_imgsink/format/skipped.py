"""``_errors.jsonl``: the rows a job left out with ``on_error="skip"``, one JSON object per line.

JSON Lines rather than Parquet because ``dd.read_parquet(out)`` reads every
``*.parquet`` below the dataset, hidden or ``_``-prefixed ones included; a
Parquet of error records would be read as if it were a shard. Every tool reads
it in one line: ``pd.read_json(path, lines=True)``, ``pl.read_ndjson(path)``,
``duckdb.sql("FROM read_json('path')")``.

Fields: ``job_id``, ``partition``, ``row`` (in its partition), ``key``,
``column`` (the column at fault, when known) and ``reason``.
"""

from __future__ import annotations

import json

FIELDS = ("job_id", "partition", "row", "key", "column", "reason")


def errors_jsonl(records: list[dict]) -> bytes:
    """The file's bytes for ``records`` (dicts with :data:`FIELDS`)."""
    return "".join(json.dumps({f: r.get(f) for f in FIELDS}, ensure_ascii=False) + "\n"
                   for r in records).encode("utf-8")


def read_errors(data: bytes) -> list[dict]:
    """Parse the file's bytes.

    Raises
    ------
    ValueError
        A line is not a JSON object with the fields.
    """
    records = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not set(FIELDS) <= set(record):
            raise ValueError(f"line {number} is not an error record with fields {list(FIELDS)}")
        records.append(record)
    return records
