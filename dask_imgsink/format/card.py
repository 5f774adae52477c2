"""The dataset card (``README.md``): points Hugging Face ``datasets`` at the tars and declares their features.

``datasets.load_dataset(out)`` reads the YAML header. Its ``configs`` make it
load ``*.tar`` (without them the Parquet files would win). Its
``dataset_info.features`` declare every field a sample may have, so the
WebDataset builder does not infer them from the first five samples, which
fails when samples differ (a null text writes no ``key.txt``) and silently
yields ``None`` for a field first seen later (PNG images after JPEG ones).
Every image format in the dataset gets its field (``jpg``, ``png``,
``webp``): each sample has exactly one of them set, and none is ever lost.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import yaml

from .layout import ERRORS_FILE, INDEX_FILE, METADATA_DIR, SUCCESS_FILE

logger = logging.getLogger("dask_imgsink")

#: Image format -> member extension (and Hugging Face field name).
FORMAT_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


class _NotJson(TypeError):
    """An Arrow type whose ``key.json`` values have no Hugging Face feature (maps, unions)."""


def json_feature(arrow: pa.DataType):
    """The Hugging Face feature (YAML form) of the values a column of ``arrow`` type has in ``key.json``.

    Types JSON has no value for are written as strings (times as ISO text,
    bytes as hex, decimals as text), so their feature is ``string``.
    """
    if pa.types.is_dictionary(arrow):
        return json_feature(arrow.value_type)
    if pa.types.is_struct(arrow):
        return {"struct": [{"name": f.name, **_named(json_feature(f.type))} for f in arrow]}
    if pa.types.is_list(arrow) or pa.types.is_large_list(arrow) or pa.types.is_fixed_size_list(arrow):
        inner = json_feature(arrow.value_type)
        return {"list": inner.get("dtype") or (inner["struct"] if "struct" in inner else inner)}
    if pa.types.is_boolean(arrow):
        return {"dtype": "bool"}
    if pa.types.is_integer(arrow):
        return {"dtype": str(arrow)}
    if pa.types.is_floating(arrow):
        return {"dtype": "float64"}
    if pa.types.is_null(arrow):
        return {"dtype": "null"}
    if (pa.types.is_string(arrow) or pa.types.is_large_string(arrow) or pa.types.is_binary(arrow)
            or pa.types.is_large_binary(arrow) or pa.types.is_temporal(arrow) or pa.types.is_decimal(arrow)):
        return {"dtype": "string"}
    raise _NotJson(str(arrow))


def _named(feature) -> dict:
    return feature if isinstance(feature, dict) else {"dtype": feature}


def hf_features(formats: list[str], text: bool, label: bool, user_schema: pa.Schema) -> list[dict] | None:
    """The card's feature list for samples with these members, or ``None`` when one cannot be declared."""
    features = [{"name": FORMAT_EXTENSIONS[f], "dtype": "image"} for f in sorted(formats) or ["jpeg"]]
    if text:
        features.append({"name": "txt", "dtype": "string"})
    if label:
        features.append({"name": "cls", "dtype": "int64"})
    if len(user_schema):
        try:
            features.append({"name": "json", **json_feature(pa.struct(list(user_schema)))})
        except _NotJson as exc:
            logger.warning("the dataset card declares no features: metadata of type %s has no "
                           "Hugging Face feature; load_dataset infers them from the first samples", exc)
            return None
    return features + [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def dataset_formats(index: dict) -> list[str]:
    """The image formats of every shard the index lists (``jpeg`` for shards that do not say)."""
    found = set()
    for entry in index.get("shardlist", []):
        found |= set(entry.get("formats") or {"jpeg": 1})
    return sorted(f for f in found if f in FORMAT_EXTENSIONS)


def dataset_card(name: str, index: dict, *, text_column: str | None, label_column: str | None,
                 user_schema: pa.Schema) -> bytes:
    """The ``README.md`` of the dataset that ``index`` describes."""
    formats = dataset_formats(index)
    header: dict = {"configs": [{"config_name": "default",
                                 "data_files": [{"split": "train", "path": "*.tar"}]}]}
    features = hf_features(formats, bool(text_column), bool(label_column), user_schema)
    if features is not None:
        header["dataset_info"] = {"features": features}
    images = ", ".join(f"`key.{FORMAT_EXTENSIONS[f]}`" for f in formats) or "`key.jpg`"
    members = [f"{images} (the image, in its own format: each sample has exactly one)"]
    if text_column:
        members.append(f"`key.txt` (column `{text_column}`; absent when null)")
    if label_column:
        members.append(f"`key.cls` (column `{label_column}`, an integer; absent when null)")
    if len(user_schema):
        members.append("`key.json` (the metadata columns)")
    columns = ", ".join(f"`{c}`" for c in user_schema.names) or "none"
    text = f"""---
{yaml.safe_dump(header, sort_keys=False).rstrip()}
---

# {name}

WebDataset shards written by dask-imgsink: {index['num_samples']} images in
{len(index['shardlist'])} shards (`{INDEX_FILE}` lists them with their sample counts and SHA-256).

- Each `*.tar` holds one sample per image: {", ".join(members)}.
- Each `*.idx` beside a tar is its DALI index (`fn.readers.webdataset(index_paths=...)`).
- `{METADATA_DIR}/*.parquet` holds one row per image, one file per tar with the same stem:
  `key`, `tar_file`, `member`, `offset` and `size` (byte range of the image inside the tar),
  `format`, `width`, `height`, `channels`, checksums, then the metadata columns ({columns}).
  Read them with `dd.read_parquet(out)` or `pd.read_parquet(out + "/{METADATA_DIR}")`.
- `{SUCCESS_FILE}` marks a complete dataset; rows left out are listed in `{ERRORS_FILE}` (JSON Lines).
"""
    return text.encode()
