"""dask-imgsink: write Dask DataFrames of images as WebDataset shards with Parquet metadata."""

from .core.encode import EncodedImage, EncodeOptions, encode_image
from .core.stage import ImageWriterStage
from .core.tasks import FileGroupTask, ImageBatch, ImageObject
from .errors import BadRowError
from .job.accessor import WriteBag, to_webdataset
from .read.verify import verify_dataset

__version__ = "0.1.0"

__all__ = [
    "BadRowError",
    "EncodeOptions",
    "EncodedImage",
    "FileGroupTask",
    "ImageBatch",
    "ImageObject",
    "ImageWriterStage",
    "WriteBag",
    "encode_image",
    "to_webdataset",
    "verify_dataset",
]
