"""ImageWriterStage: NeMo Curator's image writer contract, engine-free and without its flaws.

Same signature and I/O as ``nemo_curator.stages.image.io.ImageWriterStage``:
one :class:`~dask_imgsink.tasks.ImageBatch` in, one
:class:`~dask_imgsink.tasks.FileGroupTask` out (tars first, then Parquets).
Unlike the reference it encodes on a thread pool, writes every file under a
temporary name and renames it when complete, stores typed metadata columns and
relative tar names, writes any fsspec URL, and handles RGBA/float/uint16 input.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Mapping

import pyarrow as pa

from ..format.layout import (
    METADATA_DIR,
    WORK_DIR,
    idx_name,
    job_dir,
    jobs_root,
    parquet_name,
    staged,
)
from ..storage import is_local, join, publish, remove_empty_dir, remove_quietly, resolve
from .argcheck import check_bool, check_byte_size, check_choice, check_int
from .encode import EncodeOptions
from .stage_metadata import MetadataSchema, batch_fingerprint
from .tasks import FileGroupTask, ImageBatch
from .writer import ON_ERROR_CHOICES, Rows, ShardTarget, write_rows


@dataclass
class ImageWriterStage:
    """Write an :class:`ImageBatch` as WebDataset tar shards with Parquet metadata.

    Parameters
    ----------
    output_dir : str
        Local path or fsspec URL; created if missing.
    images_per_tar : int, default 1000
        At most this many images per tar.
    max_shard_bytes : int or str, optional
        Also close a tar before a sample that would make it larger than this
        many bytes: an integer, or a size string such as ``"500MB"`` or ``"1GiB"``.
    verbose : bool, default False
        Log each shard written at INFO level.
    deterministic_name : bool, default True
        The same batch (``dataset_name``, ``task_id``, and each object's path,
        id, image and metadata) gives the same file names, so a rerun replaces
        its own files; different batches never share a name. ``False`` gives
        fresh random names on each call.
    remove_image_data : bool, default False
        Set each written object's ``image_data`` to ``None`` after writing.
    name : str, default "image_writer"

    on_error : {"raise", "skip"}, default "raise"
        A bad row raises :class:`~dask_imgsink.BadRowError` naming it (as the
        reference does), or is left out and recorded in the result's metadata
        (``num_skipped``, ``skipped_rows``).
    metadata_schema : dict or pyarrow.Schema, optional
        Arrow types of metadata keys. Keys it does not name take their type
        from the first batch that has them.

    Notes
    -----
    Encoding is JPEG quality 92 (as in the reference). The image key is the
    object's ``image_id``; an empty id gets a generated key unique to the batch.
    The Parquet holds the writer's columns, ``image_path``, then one typed
    column per metadata key: the union of the keys of the batch's objects
    (an object without a key gets null). The first batch fixes the schema for
    the stage's life, so every shard has the same one; a later batch with a
    new key or a value of another type is refused with the key named.
    """

    output_dir: str
    images_per_tar: int = 1000
    verbose: bool = False
    deterministic_name: bool = True
    remove_image_data: bool = False
    name: str = "image_writer"
    encode_options: EncodeOptions = field(default_factory=EncodeOptions, repr=False)
    encode_threads: int | None = field(default=None, repr=False)
    storage_options: dict | None = field(default=None, repr=False)
    metadata_schema: Mapping[str, pa.DataType] | pa.Schema | None = field(default=None, repr=False)
    dali_index: bool = field(default=True, repr=False)
    on_error: str = field(default="raise", repr=False)
    max_shard_bytes: int | str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_int("images_per_tar", self.images_per_tar, low=1)
        check_choice("on_error", self.on_error, ON_ERROR_CHOICES)
        self.max_shard_bytes = check_byte_size("max_shard_bytes", self.max_shard_bytes, optional=True)
        for name in ("verbose", "deterministic_name", "remove_image_data", "dali_index"):
            check_bool(name, getattr(self, name))
        check_int("encode_threads", self.encode_threads, low=1, optional=True)
        if not isinstance(self.encode_options, EncodeOptions):
            raise TypeError(f"encode_options must be an EncodeOptions, not {type(self.encode_options).__name__}")
        self._schema = MetadataSchema(self.metadata_schema)
        self._fs, self._root = resolve(self.output_dir, self.storage_options)
        self._fs.makedirs(self._root, exist_ok=True)

    def construct_base_name(self, task: ImageBatch) -> str:
        """Base file name of the batch's shards (``images-<hash>``), see ``deterministic_name``."""
        if self.deterministic_name:
            return f"images-{batch_fingerprint(task)[:16]}"
        return f"images-{uuid.uuid4().hex[:16]}"

    def _remove_later_chunks(self, base: str, written: int) -> None:
        """Remove this batch's shards numbered from ``written`` on: an earlier run of it (with a smaller
        ``images_per_tar``, say) wrote more, and a rerun replaces all its own files."""
        chunk = written
        while self._fs.exists(tar := join(self._root, f"{base}-{chunk:06d}.tar")):
            for path in (tar, join(self._root, parquet_name(f"{base}-{chunk:06d}.tar")),
                         join(self._root, idx_name(f"{base}-{chunk:06d}.tar"))):
                remove_quietly(self._fs, path)
            chunk += 1

    def process(self, task: ImageBatch) -> FileGroupTask:
        """Write the batch; return the written files and facts about them.

        Raises
        ------
        BadRowError
            For an image or key that cannot be written; names the row and key.
            No file of this batch is left behind under a final name.
        """
        base = self.construct_base_name(task)
        objects = task.data
        meta = self._schema.table(objects, task.task_id or base) if objects else None
        rows = Rows(
            images=[obj.image_data for obj in objects],
            keys=[f"{base[len('images-'):]}_{i:08d}" if obj.image_id is None or obj.image_id == "" else obj.image_id
                  for i, obj in enumerate(objects)],
            meta=meta,
            columns={"image": "image_data", "key": "image_id"},
        )
        folder = job_dir(self._root, f"stage-{uuid.uuid4().hex[:12]}")
        self._fs.makedirs(folder, exist_ok=True)

        def target_for(i: int) -> ShardTarget:
            stem = f"{base}-{i:06d}"
            return ShardTarget(staged(folder, f"{stem}.tar"), staged(folder, f"{stem}.parquet"), f"{stem}.tar",
                               idx_path=staged(folder, f"{stem}.idx") if self.dali_index else None)

        try:
            shards, skipped = write_rows(
                rows,
                fs=self._fs,
                target_for=target_for,
                images_per_tar=int(self.images_per_tar),
                options=self.encode_options,
                on_error=self.on_error,
                partition=task.task_id or base,
                encode_threads=self.encode_threads,
                verbose=self.verbose,
                max_shard_bytes=self.max_shard_bytes,
                dali_index=self.dali_index,
            )
            tars, parquets = [], []
            if shards and is_local(self._fs):
                self._fs.makedirs(join(self._root, METADATA_DIR), exist_ok=True)
            for shard in shards:
                tar = shard.target.tar_file
                tar_final = join(self._root, tar)
                parquet_final = join(self._root, parquet_name(tar))
                publish(self._fs, shard.target.parquet_path, parquet_final)
                if shard.target.idx_path is not None:
                    publish(self._fs, shard.target.idx_path, join(self._root, idx_name(tar)))
                publish(self._fs, shard.target.tar_path, tar_final)
                tars.append(tar_final if is_local(self._fs) else self._fs.unstrip_protocol(tar_final))
                parquets.append(parquet_final if is_local(self._fs) else self._fs.unstrip_protocol(parquet_final))
            if self.deterministic_name:
                self._remove_later_chunks(base, len(shards))
        finally:
            remove_quietly(self._fs, folder, recursive=True)
            remove_empty_dir(self._fs, jobs_root(self._root))
            remove_empty_dir(self._fs, join(self._root, WORK_DIR))
        if self.remove_image_data:
            left_out = {r.row for r in skipped}
            for i, obj in enumerate(objects):
                if i not in left_out:  # a skipped object keeps its image: it was not written
                    obj.image_data = None
        return FileGroupTask(
            task_id=task.task_id,
            dataset_name=task.dataset_name,
            data=[*tars, *parquets],
            _metadata={
                **task._metadata,
                "output_dir": self.output_dir,
                "images_per_tar": self.images_per_tar,
                "num_images": sum(s.num_images for s in shards),
                "num_skipped": len(skipped),
                "skipped_rows": [{"row": r.row, "key": r.key, "column": r.column, "reason": r.reason}
                                 for r in skipped],
                "num_shards": len(shards),
                "bytes": sum(s.tar_bytes for s in shards),
            },
        )
