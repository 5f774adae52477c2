"""dask-imgsink: write Dask DataFrames of images as WebDataset shards with Parquet metadata."""

from .accessor import WriteBag, to_webdataset
from .encode import EncodedImage, EncodeOptions, encode_image
from .errors import BadRowError
from .stage import ImageWriterStage
from .tasks import FileGroupTask, ImageBatch, ImageObject

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
]
