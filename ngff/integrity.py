"""Damaged Zarr files as one line naming the file: the metadata files of a local image checked before zarr
parses them, and Blosc chunks checked for truncation before they are decoded.

zarr's own errors for damaged metadata (a JSONDecodeError, a TypeError from a dataclass, a KeyError for an
unknown codec) do not say which file they come from; `check_node` reads a node's metadata files itself and
names the first that is not a JSON object with the keys and types Zarr needs. What it does not catch (a dtype
or codec zarr does not know) the callers in `ngff` report with the node's metadata file.

numcodecs' Blosc decoder does not check a frame's length against its header: a truncated chunk that was
stored uncompressed (incompressible data) decodes without an error into whatever memory follows the buffer
(zarr-developers/numcodecs#228). `CheckedBlosc` and `CheckedBloscCodec` refuse a frame shorter than its
header says; importing `ngff` registers them for Zarr v2 (numcodecs' registry) and v3 (zarr's codec
registry and config) in place of the plain ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from numcodecs.blosc import Blosc
from numcodecs.compat import ensure_contiguous_ndarray

from ..schemas.errors import InvalidImageError

METADATA_FILES = (".zgroup", ".zarray", ".zattrs", "zarr.json")
_NONE = type(None)
# The keys Zarr needs in an array's metadata, with their JSON types.
_V2_ARRAY = {"zarr_format": int, "shape": list, "chunks": list, "dtype": (str, list), "compressor": (dict, _NONE),
             "fill_value": object, "order": str, "filters": (list, _NONE)}
_V3_ARRAY = {"shape": list, "data_type": (str, dict), "chunk_grid": dict, "chunk_key_encoding": dict,
             "fill_value": object, "codecs": list}


def metadata_file(zarr_format: int, kind: str) -> str:
    """The name of the file holding a node's attributes (`kind` "attrs"), or its array or group metadata
    ("array", "group"): zarr.json for Zarr v3; .zattrs, .zarray, .zgroup for v2."""
    return "zarr.json" if zarr_format == 3 else {"attrs": ".zattrs", "array": ".zarray", "group": ".zgroup"}[kind]


def at(url: str, node: str, name: str = "") -> str:
    """`url`/`node`/`name`, without empty parts."""
    return "/".join(p for p in (url.rstrip("/"), node.strip("/"), name) if p)


def check_node(root: Path, url: str, node: str) -> None:
    """Read the metadata files of the local node `root/node` that exist and raise an InvalidImageError naming
    the first that is not JSON, not an object, or lacks a key Zarr needs (or has it with the wrong type)."""
    for name in METADATA_FILES:
        path = root / node / name
        if not path.is_file():
            continue
        where = at(url, node, name)
        try:
            text = path.read_bytes().decode("utf-8")
            doc = json.loads(text)
        except OSError as exc:
            raise InvalidImageError(f"{where}: cannot read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise InvalidImageError(f"{where}: not valid JSON (not UTF-8 text): damaged metadata") from None
        except ValueError as exc:  # json.JSONDecodeError
            what = "an empty file" if not text.strip() else str(exc)
            raise InvalidImageError(f"{where}: not valid JSON ({what}): truncated or damaged metadata") from None
        problem = _structure_problem(name, doc)
        if problem:
            raise InvalidImageError(f"{where}: {problem}")


def _structure_problem(name: str, doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"expected a JSON object, found {type(doc).__name__}"
    if name == ".zattrs":
        return None
    if name in (".zgroup", ".zarray"):
        if doc.get("zarr_format") != 2:
            return f"zarr_format {doc.get('zarr_format')!r}, expected 2 in a Zarr v2 {name[2:]} file"
        return _array_problem(doc, _V2_ARRAY, "chunks") if name == ".zarray" else None
    if doc.get("zarr_format") != 3:
        return f"zarr_format {doc.get('zarr_format')!r}, expected 3 in zarr.json"
    if doc.get("node_type") not in ("group", "array"):
        return f"node_type {doc.get('node_type')!r}, expected 'group' or 'array'"
    if not isinstance(doc.get("attributes", {}), dict):
        return f"'attributes' is {type(doc['attributes']).__name__}, expected an object"
    return _array_problem(doc, _V3_ARRAY, None) if doc["node_type"] == "array" else None


def _array_problem(doc: dict, keys: dict, chunks_key: str | None) -> str | None:
    """What is wrong with an array's metadata: a missing or mistyped key, or a shape or chunk shape that is not
    a list of whole numbers (>= 0; chunks > 0) of one length."""
    for key, types in keys.items():
        if key not in doc:
            return f"no '{key}' in the array's metadata"
        if not isinstance(doc[key], types) or isinstance(doc[key], bool) and types is int:
            return f"'{key}' is {json.dumps(doc[key])[:40]}, not a {_type_words(types)}"
    if chunks_key is None:  # v3: the regular chunk grid's chunk shape
        chunks = (doc["chunk_grid"].get("configuration") or {}).get("chunk_shape")
        if doc["chunk_grid"].get("name") == "regular" and not isinstance(chunks, list):
            return "'chunk_grid' has no chunk_shape list"
    else:
        chunks = doc[chunks_key]
    shape = doc["shape"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        return f"shape {shape}: expected whole numbers >= 0"
    if isinstance(chunks, list) and (len(chunks) != len(shape) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in chunks)):
        return f"chunks {chunks} do not fit shape {shape}: expected {len(shape)} whole numbers > 0"
    return None


def _type_words(types: type | tuple) -> str:
    names = {int: "whole number", str: "text", list: "list", dict: "object", _NONE: "null", object: "value"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))


def check_blosc_frame(buf: Any) -> None:
    """Raise if a Blosc frame is shorter than its 16-byte header says (a truncated chunk)."""
    data = ensure_contiguous_ndarray(buf).view(np.uint8).reshape(-1)
    if len(data) < 16:
        raise RuntimeError(f"truncated Blosc frame: {len(data)} bytes, shorter than its 16-byte header")
    declared = int.from_bytes(data[12:16].tobytes(), "little")
    if declared > len(data):
        raise RuntimeError(f"a Blosc frame of {len(data):,} bytes whose header says {declared:,}: truncated or "
                           "not Blosc data")


class CheckedBlosc(Blosc):
    """numcodecs' Blosc codec, refusing truncated frames (see the module docstring)."""

    codec_id = "blosc"

    def decode(self, buf, out=None):
        check_blosc_frame(buf)
        return super().decode(buf, out)


class CheckedBloscCodec(zarr.codecs.BloscCodec):
    """zarr's Blosc codec (Zarr v3), refusing truncated frames (see the module docstring)."""

    async def _decode_single(self, chunk_bytes, chunk_spec):
        check_blosc_frame(chunk_bytes.as_numpy_array())
        return await super()._decode_single(chunk_bytes, chunk_spec)


def register_checked_blosc() -> None:
    """Use the checked Blosc codecs for every Blosc chunk zarr decodes in this process."""
    numcodecs.register_codec(CheckedBlosc)
    zarr.registry.register_codec("blosc", CheckedBloscCodec)
    zarr.config.set({"codecs.blosc": f"{CheckedBloscCodec.__module__}.{CheckedBloscCodec.__qualname__}"})
