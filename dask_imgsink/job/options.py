"""The settings of one ``to_webdataset`` job: validated once, shipped to every task.

Also the job's shard naming rules. Where numbering starts is decided by the job
once it holds the output directory (:class:`~dask_imgsink.job.claim.Claim`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import pyarrow as pa

from ..core.argcheck import check_bool, check_byte_size, check_choice, check_int
from ..core.encode import EncodeOptions
from ..s3copy import obstore_setting
from .output import MODE_CHOICES
from .spread import spread_files_setting
from .unique import UNIQUE_KEYS_CHOICES

PACKING_CHOICES = ("exact", "per_partition")

_PREFIX = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class WriteOptions:
    """Everything a write, merge or commit task needs to know (picklable, small)."""

    url: str
    root: str
    storage_options: dict | None
    image_column: str
    key_column: str | None
    text_column: str | None
    label_column: str | None
    metadata_columns: tuple[str, ...]
    user_schema: pa.Schema
    images_per_tar: int
    encode: EncodeOptions
    deterministic_name: bool
    name_prefix: str
    encode_threads: int | None
    packing: str
    mode: str
    on_error: str
    dataset_name: str
    unique_keys: str = "dataset"
    dali_index: bool = True
    max_shard_bytes: int | str | None = None  # an int once checked
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: the fewest files in each worker's share of the commit's copies on S3 (``imgsink.commit-spread-files``)
    commit_spread_files: int | None = field(default_factory=spread_files_setting)
    #: send the commit's copies on S3 through obstore where it can (``imgsink.commit-obstore``)
    commit_obstore: bool = field(default_factory=obstore_setting)

    def __post_init__(self) -> None:
        check_int("images_per_tar", self.images_per_tar, low=1)
        # a size string ("1GB") becomes its bytes here, so every later step and the index see an int
        object.__setattr__(self, "max_shard_bytes", check_byte_size("max_shard_bytes", self.max_shard_bytes,
                                                                   optional=True))
        check_bool("deterministic_name", self.deterministic_name)
        check_bool("dali_index", self.dali_index)
        check_choice("unique_keys", self.unique_keys, UNIQUE_KEYS_CHOICES)
        if not isinstance(self.name_prefix, str) or not _PREFIX.match(self.name_prefix):
            raise ValueError(
                f"name_prefix={self.name_prefix!r} must be letters, digits, '_' or '-' "
                "(no '.', '/'), so shard names stay plain and brace patterns work"
            )
        check_choice("packing", self.packing, PACKING_CHOICES)
        check_choice("mode", self.mode, MODE_CHOICES)
        check_choice("on_error", self.on_error, ("raise", "skip"))
        check_int("encode_threads", self.encode_threads, low=1, optional=True)

    # ------------------------------------------------------------------ names

    def _stem_prefix(self) -> str:
        if self.deterministic_name:
            return self.name_prefix
        return f"{self.name_prefix}-{self.job_id[:8]}"

    def exact_stem(self, index: int) -> str:
        """Base name of the ``index``-th shard of the dataset (exact packing)."""
        return f"{self._stem_prefix()}-{index:06d}"

    def partition_stem(self, partition: int, chunk: int) -> str:
        """Base name of chunk ``chunk`` of ``partition`` (numbered in the dataset), for per-partition packing."""
        return f"{self._stem_prefix()}-{partition:06d}-{chunk:06d}"

    def recorded(self) -> dict:
        """The settings recorded with the job in ``_index.json``."""
        return {
            "packing": self.packing, "images_per_tar": self.images_per_tar,
            "max_shard_bytes": self.max_shard_bytes,
            "image_format": self.encode.image_format, "quality": self.encode.quality,
            "max_pixels": self.encode.max_pixels, "image_column": self.image_column,
            "key_column": self.key_column, "text_column": self.text_column,
            "label_column": self.label_column, "metadata_columns": list(self.metadata_columns),
            "on_error": self.on_error, "mode": self.mode, "unique_keys": self.unique_keys,
            "validate": self.encode.validate, "dali_index": self.dali_index,
        }

    def token(self) -> tuple:
        """What identifies these settings, for ``__dask_tokenize__``."""
        return ("dask_imgsink.WriteOptions", self.job_id, self.url, self.images_per_tar, self.max_shard_bytes,
                self.packing)
