"""The Dask side: claim -> write tasks -> (plan -> assemble) -> commit -> Bag[FileGroupTask].

The graph reads like ``to_parquet``'s: a claim task that takes the output
directory (:mod:`~dask_imgsink.job.claim`), one picklable per-partition writer
(:class:`~dask_imgsink.job.write.PartitionWriter`) holding the settings, then,
for exact packing, a few assembly tasks (one per group of partitions, each
handing the next where its plan left off and the runs of its open shard),
then one barrier task that commits, or, when a task failed, cleans up
and raises its error. Task names start with ``imgsink-`` so progress
bars and the dashboard show what runs. Nothing here knows image formats.
"""

from __future__ import annotations

import operator
import posixpath
from dataclasses import replace
from functools import partial
from typing import Mapping, Sequence

import dask
import pyarrow as pa
import pyarrow.parquet as pq
from dask.base import tokenize
from dask.dataframe.extensions import register_dataframe_accessor
from dask.highlevelgraph import HighLevelGraph

from ..core.argcheck import check_bool, check_optional_str
from ..core.encode import DEFAULT_MAX_PIXELS, EncodeOptions
from ..core.pool import default_encode_threads
from ..core.tarshard import hex_digest
from ..core.tasks import FileGroupTask
from ..format.schema import (
    default_metadata_columns,
    read_from_dataset,
    shard_schema,
    unfit_column_error,
    user_schema_from_meta,
)
from ..storage import resolve
from .bag import WriteBag, claim_key, register_job
from .claim import Claim, claim_output, committed_job
from .cleanup import abort_job
from .commit import commit_job
from .head import carry_budget
from .lock import liveness, locked_error, read_lock
from .options import WriteOptions
from .output import check_output, schema_to_append
from .packing import Carry, assemble_group, assemble_shards, runs_by_partition, summarize  # noqa: F401
from .plan import plan_shards
from .results import PartitionResult, TaskFailed, failure, first_failure
from .unique import cross_partition_duplicate, dataset_key_hashes, needs_dataset_keys
from .write import PartitionWriter, check_image_dtype, check_label_dtype, writes_need_claim


def _raise_if_failed(failed: TaskFailed | None, claim: Claim, opts: WriteOptions) -> None:
    """A task of the job failed: remove its staging, free the directory, raise the task's error."""
    if failed is not None:
        abort_job(opts.url, opts.storage_options, opts.job_id, claim.run_id)
        failed.reraise()


def _commit_exact_job(claim: Claim, carried: Carry | TaskFailed | None, assembled: list, summarized: list,
                      num_partitions: int, existing_keys=None, *, opts: WriteOptions):
    """The commit task of exact packing: each assembly group hands it its shards and its writes' summaries."""
    if isinstance(carried, TaskFailed):
        _raise_if_failed(first_failure(assembled) or carried, claim, opts)
    summaries = [summary for group in summarized for summary in group]
    return _commit_exact(claim, summaries, assembled, num_partitions, opts, existing_keys)


def _commit_exact(claim: Claim, summaries: list, assembled: list, num_partitions: int, opts: WriteOptions,
                  existing_keys=None):
    plan = plan_shards(summaries, claim, opts, existing_keys)
    _raise_if_failed(plan.failed or first_failure(assembled) or _unfit_column(summaries, claim, opts), claim, opts)
    built = sorted((item for part in assembled for item in part), key=lambda t: t[0])
    if not claim.done:
        _check_every_shard_built([i for i, _, _ in built], plan, opts)
    # an assembly group hands its shards on without waiting for their SHA-256s: taken here
    shards = [(replace(s, tar_sha256=hex_digest(s.tar_sha256)), parts) for _, s, parts in built]
    return commit_job(claim, shards, plan.rows_in, plan.skipped, num_partitions, opts)


def _check_every_shard_built(built: list[int], plan, opts: WriteOptions) -> None:
    """Refuse to commit unless the assembly tasks built each planned shard exactly once.

    Reruns after the job committed build nothing; the commit then returns what it
    committed, so they pass.
    """
    expected = list(range(plan.first_shard, plan.first_shard + plan.num_shards))
    if built != expected and not _already_committed(opts):
        missing = sorted(set(expected) - set(built))
        twice = sorted({i for i in built if built.count(i) > 1})
        raise RuntimeError(f"internal error: the assembly built shards {built[:20]}, not {len(expected)} shards "
                           f"from {plan.first_shard} (missing {missing[:20]}, built twice {twice[:20]}); "
                           "nothing was committed; please report this with the job's options")


def _already_committed(opts: WriteOptions) -> bool:
    fs, root = resolve(opts.url, opts.storage_options)
    return committed_job(fs, root, opts.job_id) is not None


def _unfit_column(results: list[PartitionResult], claim: Claim, opts: WriteOptions) -> TaskFailed | None:
    """A failure when a metadata column's type fits none of its values in the whole job (see ``user_table``)."""
    if claim.done:  # a rerun after the commit: the job was judged then
        return None
    error = unfit_column_error([r.fitting for r in results if r.fitting], opts.user_schema)
    return None if error is None else failure(error, "the check of the metadata columns' types")


def _commit_per_partition(claim: Claim, results: list, num_partitions: int, opts: WriteOptions):
    failed = first_failure(results)
    if failed is None and not claim.done:
        duplicate = cross_partition_duplicate(results, opts)
        failed = None if duplicate is None else failure(duplicate, "the check for duplicate keys")
    _raise_if_failed(failed or _unfit_column(results, claim, opts), claim, opts)
    results = sorted(results, key=lambda r: r.partition)
    shards = [(s, [r.partition]) for r in results for s in r.shards]
    skipped = [s for r in results for s in r.skipped]
    return commit_job(claim, shards, sum(r.rows_in for r in results), skipped, num_partitions, opts)


def to_webdataset(
    ddf,
    output_dir: str,
    *,
    image_column: str = "image",
    key_column: str | None = None,
    images_per_tar: int = 1000,
    max_shard_bytes: int | str | None = None,
    image_format: str = "jpeg",
    quality: int = 92,
    text_column: str | None = None,
    label_column: str | None = None,
    metadata_columns: Sequence[str] | None = None,
    metadata_schema: Mapping[str, pa.DataType] | pa.Schema | None = None,
    deterministic_name: bool = True,
    name_prefix: str = "shard",
    encode_threads: int | None = None,
    storage_options: dict | None = None,
    packing: str = "exact",
    mode: str = "error",
    on_error: str = "raise",
    jpeg_alpha: str = "error",
    reencode: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    validate: str = "complete",
    unique_keys: str = "dataset",
    dali_index: bool = True,
    dataset_name: str | None = None,
    compute: bool = False,
    compute_kwargs: dict | None = None,
) -> WriteBag | list[FileGroupTask]:
    """Write a Dask DataFrame of images as WebDataset shards with Parquet metadata.

    Each sample becomes ``key.jpg`` (or ``.png``/``.webp``, or the format of
    already-encoded bytes) plus ``key.txt`` (``text_column``), ``key.cls``
    (``label_column``) and ``key.json`` (metadata columns) in a ``.tar``; each
    tar gets a ``.parquet`` with one row per image. The job then writes
    ``_index.json`` (wids shard index), ``README.md`` (dataset card) and
    ``_SUCCESS``.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
        One row per image.
    output_dir : str
        Local path or fsspec URL of the dataset directory.
    image_column : str, default "image"
        Object column of NumPy arrays, encoded bytes, PIL images or
        ``{"bytes", "path"}`` dicts; a ``pd.ArrowDtype(pa.binary())`` column;
        or an Arrow ``struct<bytes: binary, path: string>`` column (Hugging
        Face images, as ``dd.read_parquet`` returns them).
    key_column : str, optional
        Sample keys (no ``.``, ``/``, ``\\``, control characters; at most 95
        bytes). By default keys are generated from partition and row, unique in
        the dataset.
    images_per_tar : int, default 1000
        Images per shard.
    max_shard_bytes : int or str, optional
        Also close a shard before a sample that would make its tar larger than
        this many bytes (whichever limit comes first): an integer, or a size
        string as Dask reads them (``"500MB"``, ``"1GiB"``). ``images_per_tar``
        still applies: to cap shards by bytes alone, raise it too. With exact packing every
        shard but the last is as full as both limits allow. A sample larger than
        the limit on its own gets a shard of its own; the index marks that shard
        ``"oversized": true`` and the commit logs a warning.
    image_format : {"jpeg", "png", "webp"}, default "jpeg"
        Format of pixel inputs. Encoded bytes are kept as they are unless ``reencode``.
    quality : int, default 92
        JPEG/WebP quality.
    text_column, label_column : str, optional
        Columns written as ``key.txt`` (UTF-8 ``str``; ``bytes`` must be UTF-8)
        and ``key.cls`` (integer class ids). A null value writes no member.
    metadata_columns : list of str, optional
        Columns for ``key.json`` and the Parquet; default every column but the
        image and key columns. A DataFrame read with :func:`read_webdataset`
        (it holds the writer's location columns ``tar_file``, ``offset``, ...)
        is written again without the writer's columns, which are recomputed,
        and keeps its keys (``key_column`` defaults to ``"key"``).
    metadata_schema : dict or pyarrow.Schema, optional
        Arrow types for metadata columns whose dtype does not say (object
        columns default to ``string``).
    deterministic_name : bool, default True
        Same input and options give the same names and bytes. ``False`` puts a
        job token in the shard names.
    name_prefix : str, default "shard"
        Shards are ``{name_prefix}-000000.tar``, ... (exact packing) or
        ``{name_prefix}-{partition:06d}-{chunk:06d}.tar`` (per-partition).
    encode_threads : int, optional
        Encoder threads per worker process; default the worker's thread count
        (or the CPUs of this process outside a worker).
    storage_options : dict, optional
        Passed to fsspec, as in ``dask.dataframe.to_parquet``.
    packing : {"exact", "per_partition"}, default "exact"
        ``"exact"``: every shard holds ``images_per_tar`` images (or as many as
        ``max_shard_bytes`` allows) but the last, in row order, names contiguous. ``"per_partition"``: each partition
        writes its own shards, with no cross-partition step.
    mode : {"error", "overwrite", "append"}, default "error"
        What to do when ``output_dir`` is not empty: refuse; replace the
        dataset there at commit time, removing only the files its index and
        fixed names account for (any other file makes it refuse); or add shards
        after those listed in its ``_index.json`` (same Parquet schema only).
        In every mode the job holds the directory while it runs: a second job
        gets :class:`~dask_imgsink.OutputLockedError`.
    on_error : {"raise", "skip"}, default "raise"
        A bad row raises :class:`~dask_imgsink.BadRowError` naming its
        partition, row, key and column, or is left out and recorded in ``_errors.jsonl``.
    jpeg_alpha : {"error", "drop", "white"}, default "error"
        4-channel images written as JPEG: raise, drop alpha, or composite over white.
    reencode : bool, default False
        Re-encode encoded inputs whose format is not ``image_format``.
    max_pixels : int, default 16384 * 16384
        Largest image (width x height) written; a larger one is a bad row. The
        index records it, and ``verify`` decodes with the same limit.
    validate : {"complete", "decode", "header"}, default "complete"
        How already-encoded bytes are checked before they are passed through:
        that the file is whole (a JPEG ends with its EOI marker, a PNG with its
        IEND chunk, a WebP's RIFF size matches), that it decodes fully, or only
        that its header parses. A failing image is a bad row.
    unique_keys : {"dataset", "shard"}, default "dataset"
        Keys must be unique in the whole dataset (this job's rows, and the
        dataset's keys when appending), or only within each shard (what
        WebDataset readers need). The first copy in row order is kept; a later
        one is a bad row. With ``packing="per_partition"`` a duplicate across
        partitions cannot be left out (its shard is already written), so it
        fails the job whatever ``on_error`` says.
    dali_index : bool, default True
        Write a DALI index (``shard-000000.idx``) beside each tar, built from
        the offsets known while writing.
    dataset_name : str, optional
        Name in the index and card; default the directory's name.
    compute : bool, default False
        Run now and return the list of :class:`FileGroupTask`.
    compute_kwargs : dict, optional
        Passed to ``compute`` when ``compute=True``.

    Returns
    -------
    WriteBag or list of FileGroupTask
        A lazy ``dask.bag.Bag`` of one :class:`FileGroupTask` per shard pair
        (nothing is written until computed), or the computed list.

    Raises
    ------
    TypeError
        If the image column cannot hold images (for example it became text
        through ``dataframe.convert-string``).
    ValueError
        For an unknown column or option.
    FileExistsError
        ``mode="error"`` and ``output_dir`` is not empty.
    OutputLockedError
        Another job holds ``output_dir`` (checked again when the job runs).
    """
    fs, opts = _build_options(
        ddf, output_dir, image_column=image_column, key_column=key_column,
        images_per_tar=images_per_tar, max_shard_bytes=max_shard_bytes, image_format=image_format, quality=quality,
        text_column=text_column, label_column=label_column, metadata_columns=metadata_columns,
        metadata_schema=metadata_schema, deterministic_name=deterministic_name,
        name_prefix=name_prefix, encode_threads=encode_threads, storage_options=storage_options,
        packing=packing, mode=mode, on_error=on_error, jpeg_alpha=jpeg_alpha, reencode=reencode,
        max_pixels=max_pixels, validate=validate, unique_keys=unique_keys, dali_index=dali_index,
        dataset_name=dataset_name,
    )
    check_bool("compute", compute)
    compute_kwargs = compute_kwargs or {}
    bag = _build_graph(ddf, opts, compute_kwargs.get("scheduler") if compute else None)
    if not compute:
        return bag
    return bag.compute(**compute_kwargs)


def _build_options(ddf, output_dir: str, *, image_column, key_column, images_per_tar, max_shard_bytes,
                   image_format,
                   quality, text_column, label_column, metadata_columns, metadata_schema,
                   deterministic_name, name_prefix, encode_threads, storage_options, packing, mode,
                   on_error, jpeg_alpha, reencode, max_pixels, validate, unique_keys, dali_index,
                   dataset_name) -> tuple[object, WriteOptions]:
    """Validate the arguments against the DataFrame and the output directory."""
    columns = list(ddf.columns)
    if key_column is None and read_from_dataset(columns):
        key_column = "key"  # a frame read back with read_webdataset keeps its keys
    for name, col in (("image_column", image_column), ("key_column", key_column),
                      ("text_column", text_column), ("label_column", label_column)):
        if col is not None and col not in columns:
            raise ValueError(f"{name}={col!r} is not a column of the DataFrame; columns: {columns}")
    check_distinct_roles(image_column=image_column, key_column=key_column, text_column=text_column,
                         label_column=label_column)
    check_column_names(columns, [c for c in (image_column, key_column, text_column, label_column) if c is not None])
    check_image_dtype(ddf._meta[image_column].dtype, image_column)
    if label_column is not None:
        check_label_dtype(ddf._meta[label_column].dtype, label_column)
    check_optional_str("dataset_name", dataset_name)
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"storage_options must be a dict, not {type(storage_options).__name__}")
    if metadata_columns is None:
        metadata_columns = default_metadata_columns(columns, image_column, key_column)
    else:
        metadata_columns = list(metadata_columns)
        twice = sorted({c for c in metadata_columns if metadata_columns.count(c) > 1}, key=str)
        if twice:
            raise ValueError(f"metadata_columns names {twice} more than once; a Parquet file cannot hold two "
                             "columns of one name (readers refuse it): name each once")
        missing = [c for c in metadata_columns if c not in columns]
        if missing:
            raise ValueError(f"metadata_columns {missing} are not columns of the DataFrame; columns: {columns}")
        if image_column in metadata_columns:
            raise ValueError(f"metadata_columns must not include the image column {image_column!r}")
    check_column_names(columns, metadata_columns)
    user_schema = user_schema_from_meta(ddf._meta, metadata_columns, metadata_schema)
    check_parquet_types(user_schema)
    encode = EncodeOptions(image_format=image_format, quality=quality, jpeg_alpha=jpeg_alpha, reencode=reencode,
                           max_pixels=max_pixels, validate=validate)

    fs, root = resolve(output_dir, storage_options)
    if mode == "append":
        user_schema = schema_to_append(fs, root, user_schema)
    opts = WriteOptions(
        url=str(output_dir),
        root=root,
        storage_options=storage_options,
        image_column=image_column,
        key_column=key_column,
        text_column=text_column,
        label_column=label_column,
        metadata_columns=tuple(metadata_columns),
        user_schema=user_schema,
        images_per_tar=images_per_tar,
        max_shard_bytes=max_shard_bytes,
        encode=encode,
        deterministic_name=deterministic_name,
        name_prefix=name_prefix,
        encode_threads=encode_threads,
        packing=packing,
        mode=mode,
        on_error=on_error,
        dataset_name=dataset_name or posixpath.basename(root.rstrip("/")) or "dataset",
        unique_keys=unique_keys,
        dali_index=dali_index,
    )
    _check_output_early(fs, root, opts)
    return fs, opts


def check_column_names(columns: list, used: list) -> None:
    """Refuse columns the job writes whose names are not distinct strings: Parquet fields and key.json keys are."""
    not_text = [c for c in used if not isinstance(c, str)]
    if not_text:
        raise TypeError(f"column names {not_text[:5]!r} are not strings; Parquet and key.json name columns with "
                        "text. Rename them: ddf.columns = [str(c) for c in ddf.columns]")
    twice = sorted({c for c in used if columns.count(c) > 1})
    if twice:
        raise ValueError(f"the DataFrame has more than one column named {twice}; rename them "
                         "(ddf.columns = [...]) so that each name is one column")


def check_distinct_roles(**roles: str | None) -> None:
    """Refuse one column in two roles (``label_column == key_column``, say): each is written in its own way."""
    named = {role: column for role, column in roles.items() if column is not None}
    for role, column in named.items():
        other = [r for r, c in named.items() if c == column and r != role]
        if other:
            raise ValueError(f"{role}={column!r} is also the {other[0]}; each role needs a column of its own: "
                             f"copy it (ddf = ddf.assign({column}_copy=ddf[{column!r}])) and name the copy")


def check_parquet_types(user_schema: pa.Schema) -> None:
    """Refuse a metadata column whose Arrow type Parquet cannot store, or key.json cannot say, naming it
    (not a failure mid-job, nor a silent change)."""
    for field in user_schema:
        if isinstance(field.type, pa.ExtensionType):  # pandas' Period and Interval, say
            raise TypeError(f"metadata column {field.name!r} has the Arrow extension type {field.type}, whose values "
                            "key.json would hold as their storage (a Period as an integer, an Interval without "
                            "its closed side); convert it (ddf[col].astype(str), say) or leave it out with "
                            "metadata_columns=[...]")
        try:
            pq.write_table(pa.table({field.name: pa.array([], type=field.type)}), pa.BufferOutputStream())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TypeError(f"metadata column {field.name!r} has Arrow type {field.type}, which Parquet cannot "
                            f"store ({exc}); convert it (ddf[col].astype(str), say) or leave it out with "
                            "metadata_columns=[...]") from None


def _check_output_early(fs, root: str, opts: WriteOptions) -> None:
    """Fail before any work when the directory is held by a live job or does not suit the mode.

    The job checks again once it holds the directory; this only saves a
    doomed job from starting.
    """
    holder = read_lock(fs, root)
    if holder is not None:
        state, why = liveness(holder)
        if state != "dead":
            raise locked_error(opts.url, holder, state, why)
    check_output(fs, root, opts.url, opts.mode, shard_schema(opts.user_schema))


#: Most partitions in one assembly group: a group's runs wait in memory until its last one is
#: encoded, and meet on the worker that assembles it (half of them arriving from other workers).
MAX_GROUP_PARTITIONS = 4
#: The same in a job of more than :data:`MANY_PARTITIONS` partitions, where the partitions are
#: likely small and each group task's fixed cost counts (500 partitions of 10 images).
MAX_GROUP_PARTITIONS_MANY = 8
MANY_PARTITIONS = 64


def group_cap(num_partitions: int) -> int:
    """Most partitions in one assembly group of a job of ``num_partitions`` partitions."""
    return MAX_GROUP_PARTITIONS if num_partitions <= MANY_PARTITIONS else MAX_GROUP_PARTITIONS_MANY


_DISTRIBUTED_NAMES = ("distributed", "dask.distributed")


def _client_nthreads(scheduler=None) -> dict | None:
    """The workers and threads of the Client that will run the job, or ``None`` if this process will.

    ``scheduler`` is ``compute``'s argument when the job is computed at once; without it,
    Dask's ``scheduler`` config. As in ``dask.base.get_scheduler``, a local scheduler named
    there ("threads", "sync", ...) runs the job here even while a Client is active, a Client
    named there runs it, and otherwise the active Client does.
    """
    named = scheduler if scheduler is not None else dask.config.get("scheduler", None)
    if "Client" in type(named).__name__ and hasattr(named, "nthreads"):  # as dask.base.get_scheduler tells
        client = named
    elif named is not None and not (isinstance(named, str) and named.lower() in _DISTRIBUTED_NAMES):
        return None  # a local scheduler, an Executor or a function of yours
    else:
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):
            return None
    return client.nthreads() if client.status == "running" else None  # a closed Client runs nothing


def _cluster_threads(nthreads: dict | None) -> int:
    """Threads of the Client's workers (``nthreads``, from :func:`_client_nthreads`), or the
    CPUs of this process without a Client."""
    return default_encode_threads() if nthreads is None else sum(nthreads.values())


def _assembly_groups(num_partitions: int, threads: int) -> list[range]:
    """Contiguous groups of partitions, one assembly task each, for ``threads`` threads running the job.

    Assembly writes bytes; it needs about as many tasks as there are threads to
    run them, not one per partition (most partitions of a filtered DataFrame
    start no shard, and each task costs a scheduler round trip): two per thread,
    of at most :func:`group_cap` partitions each, so the runs waiting for their
    group stay few whatever the job's size. The last group is split in
    halves down to one partition: what is left to write once the last partition
    is encoded (the tail, when cores idle) is only the shards that end in it.
    """
    if num_partitions == 0:
        return []
    tasks = max(1, min(num_partitions, 2 * threads))
    size = min(-(-num_partitions // tasks), group_cap(num_partitions))
    groups = [range(start, min(start + size, num_partitions)) for start in range(0, num_partitions, size)]
    last = groups.pop()
    while len(last) > 1:
        half = range(last.start, last.start + len(last) // 2)
        groups.append(half)
        last = range(half.stop, last.stop)
    return [*groups, last]


def _exact_packing_tasks(graph: dict, written: list, claim: str, opts: WriteOptions, token: str,
                         scheduler=None) -> str:
    """Add the assembly groups, chained by what they carry, and the commit; return the commit's key.

    A write task's result holds its run's bytes; only its own assembly group
    receives it (and, for the rows of a shard still open at the group's end,
    the next group), and Dask frees it once used. Each group hands the next
    where its plan left off (:mod:`.window`), and the commit the summaries of
    its own writes, so the graph has one edge per partition, not one per
    partition and group, and no group's work grows with the groups before it.
    """
    existing = None  # the dataset's keys, read once for every plan when appending with unique_keys="dataset"
    if needs_dataset_keys(opts):
        existing = f"imgsink-dataset-keys-{token}"
        graph[existing] = (partial(dataset_key_hashes, opts=opts), claim)
    carried, built, summarized = None, [], []  # the first group starts from nothing
    nthreads = _client_nthreads(scheduler)  # asked of the scheduler once, for the groups and the budget
    groups = _assembly_groups(len(written), _cluster_threads(nthreads))
    # an adaptive cluster may have no worker yet: it will have several
    budget = carry_budget(several_workers=nthreads is not None and len(nthreads) != 1)
    for i, g in enumerate(groups):
        out = (f"imgsink-pack-shards-{token}", i)
        assemble = partial(assemble_group, opts=opts, last=i == len(groups) - 1, carry_bytes=budget)
        # the dataset's keys go to the first group, which hands them on in its window's key log
        graph[out] = (assemble, carried, written[g.start:g.stop], claim, g, existing if i == 0 else None)
        built.append((f"imgsink-shards-built-{token}", i))
        graph[built[-1]] = (operator.getitem, out, 0)
        carried = (f"imgsink-runs-carried-{token}", i)
        graph[carried] = (operator.getitem, out, 1)
        summarized.append((f"imgsink-writes-summarized-{token}", i))
        graph[summarized[-1]] = (operator.getitem, out, 2)
    commit = f"imgsink-commit-{token}"
    graph[commit] = (partial(_commit_exact_job, opts=opts), claim, carried, built, summarized, len(written),
                     existing)
    return commit


def _build_graph(ddf, opts: WriteOptions, scheduler=None) -> WriteBag:
    """The job's tasks, as a plain task graph (built in about a millisecond, whatever the partitions).

    ``scheduler``: ``compute``'s, when the job is computed at once (see :func:`_client_nthreads`).
    """
    token = tokenize(*opts.token())
    register_job(token, opts)
    parts = ddf.to_delayed(optimize_graph=True)
    claim = claim_key(token)
    graph: dict = {claim: (claim_output, opts, token)}
    writer = PartitionWriter(opts)
    written = [(f"imgsink-encode-write-{token}", i) for i in range(len(parts))]
    write_claim = claim if writes_need_claim(opts) else None  # else the assembly groups wait for it
    for i, (key, part) in enumerate(zip(written, parts)):
        graph[key] = (writer, part.key, i, write_claim)
    if opts.packing == "exact":
        final = _exact_packing_tasks(graph, written, claim, opts, token, scheduler)
    else:
        final = f"imgsink-commit-{token}"
        graph[final] = (partial(_commit_per_partition, opts=opts), claim, written, len(parts))
    name = f"imgsink-tasks-{token}"
    graph[(name, 0)] = final
    return WriteBag(HighLevelGraph.from_collections(name, graph, dependencies=parts), name, 1)


@register_dataframe_accessor("imgsink")
class ImgsinkAccessor:
    """``ddf.imgsink``: write a Dask DataFrame of images as WebDataset shards."""

    def __init__(self, ddf) -> None:
        self._ddf = ddf

    def to_webdataset(self, output_dir: str, **kwargs) -> WriteBag | list[FileGroupTask]:
        return to_webdataset(self._ddf, output_dir, **kwargs)


ImgsinkAccessor.to_webdataset.__doc__ = to_webdataset.__doc__
