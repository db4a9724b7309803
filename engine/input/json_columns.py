"""Source columns of JSON lines: the Arrow type of a JSON value, a file's passthrough schema from its first
object, and the coercion of every later object's values to that schema (reader.py), losing nothing silently."""
from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa


def castable(src: pa.DataType, dst: pa.DataType) -> bool:
    try:
        pa.array([], type=src).cast(dst)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def json_type(value) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()  # strings, and objects/arrays kept as JSON text


def json_schema(obj: dict, text_column: str, id_column: str) -> pa.Schema:
    return pa.schema([(k, json_type(v)) for k, v in obj.items() if k not in (text_column, id_column)])


class JsonCoercer:
    """Fit a JSON object's passthrough values to the output schema, losing nothing silently."""

    def __init__(self, schema: pa.Schema | None, path: Path, warn):
        self.fields = {fl.name: fl.type for fl in schema} if schema else {}
        self.path, self.warn = path, warn
        self.warned: set[str] = set()

    def __call__(self, obj: dict, text_column: str, id_column: str) -> dict:
        out = {text_column: obj.get(text_column), id_column: obj.get(id_column)}
        for name, tp in self.fields.items():
            v = obj.get(name)
            if v is not None and json_type(v) != tp:
                if tp == pa.float64() and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                elif tp == pa.string():
                    v = orjson.dumps(v).decode()
                else:
                    if name not in self.warned:
                        self.warned.add(name)
                        self.warn(f"{self.path}: column {name!r} holds a {type(v).__name__} where earlier rows hold "
                                  f"{tp}; such values are stored as null in that column")
                    v = None
            out[name] = v
        return out
