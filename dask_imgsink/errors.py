"""Errors raised for bad input rows, with the row's whereabouts and the fix."""

from __future__ import annotations


class RowProblem(ValueError):
    """A problem with one row's value, before we know where the row sits.

    Raised by the engine-free helpers (encoder, key rules); the writer adds the
    partition, row and key and raises :class:`BadRowError`, or records the row
    as skipped when ``on_error="skip"``.
    """

    def __init__(self, reason: str, fix: str = "", column: str | None = None) -> None:
        self.reason = reason
        self.fix = fix
        self.column = column
        super().__init__(f"{reason}. {fix}".strip() if fix else reason)

    def __reduce__(self):
        return (RowProblem, (self.reason, self.fix, self.column))


class MissingDependencyError(ImportError):
    """A package the job needs is not installed where the job runs (a worker, say).

    Not a row's fault, so never skipped: the job fails with this error at the client.
    """


class BadRowError(ValueError):
    """A row that cannot be written; names the partition, row, key, column, reason and fix."""

    def __init__(
        self,
        reason: str,
        *,
        fix: str = "",
        partition: int | str | None = None,
        row: int | None = None,
        key: str | None = None,
        column: str | None = None,
    ) -> None:
        self.reason = reason
        self.fix = fix
        self.partition = partition
        self.row = row
        self.key = key
        self.column = column
        where = []
        if partition is not None:
            where.append(f"partition {partition}")
        if row is not None:
            where.append(f"row {row}")
        if key is not None:
            where.append(f"key {key!r}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = ", ".join(where)
        text = f"{prefix}: {reason}" if prefix else reason
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)

    def __reduce__(self):  # keep the fields when Dask ships the error to the client
        return (
            _rebuild_bad_row,
            (self.reason, self.fix, self.partition, self.row, self.key, self.column),
        )


def _rebuild_bad_row(reason, fix, partition, row, key, column=None) -> BadRowError:
    return BadRowError(reason, fix=fix, partition=partition, row=row, key=key, column=column)


class CorruptSampleError(ValueError):
    """A sample read back does not match its recorded checksum or byte range; names the shard and key."""

    def __init__(self, shard: str, key: str, reason: str) -> None:
        self.shard, self.key, self.reason = shard, key, reason
        super().__init__(
            f"{shard}: sample {key!r}: {reason}; run `dask-imgsink verify` on the dataset to list all damage, "
            "then rewrite it from its source (or pass verify=False to read it as it is)"
        )

    def __reduce__(self):
        return CorruptSampleError, (self.shard, self.key, self.reason)
