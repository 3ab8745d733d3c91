"""JSON schemas for the structured-output tests: every feature the grammar must enforce, each
bounded (lengths, ranges, enums) so that even a random-weights model finishes its JSON."""

from __future__ import annotations

from typing import Any


def _s(n: int = 10) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCHEMAS: dict[str, dict[str, Any]] = {
    "object": _obj({"name": _s(), "age": AGE}),
    "optional fields": _obj(
        {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "note": _s(), "flag": {"type": "boolean"}}, ["id"]
    ),
    "nested": _obj(
        {
            "user": _obj(
                {"name": _s(8), "address": _obj({"city": _s(8), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}
            )
        }
    ),
    "array of integers": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 1,
        "maxItems": 4,
    },
    "array of objects": {
        "type": "array",
        "items": _obj({"k": _s(4), "v": {"type": "boolean"}}),
        "minItems": 2,
        "maxItems": 3,
    },
    "enum of strings": _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]}}),
    "enum of mixed values": {"enum": ["auto", 3, None, True, {"x": 1}]},
    "const": _obj({"version": {"const": "v1"}, "kind": {"const": 7}}),
    "string pattern": _obj(
        {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
            "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,10}$"},
        }
    ),
    "string lengths": _obj(
        {
            "short": {"type": "string", "minLength": 2, "maxLength": 3},
            "word": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        }
    ),
    "integer range": _obj(
        {
            "n": {"type": "integer", "minimum": -5, "maximum": 5},
            "m": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
        }
    ),
    "number range": _obj(
        {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
            "temp": {"type": "integer", "minimum": -40, "maximum": 60},
        }
    ),
    "multipleOf": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5},
    "formats": _obj({"day": {"type": "string", "format": "date"}, "at": {"type": "string", "format": "time"}}),
    "nullable union": _obj(
        {"a": {"type": ["integer", "null"], "maximum": 9, "minimum": 0}, "b": {"anyOf": [_s(5), {"type": "null"}]}}
    ),
    "anyOf": {
        "anyOf": [_obj({"kind": {"const": "circle"}, "r": AGE}), _obj({"kind": {"const": "square"}, "side": AGE})]
    },
    "oneOf": {"oneOf": [{"type": "boolean"}, _obj({"ok": {"type": "boolean"}})]},
    "$defs and $ref": {
        "$defs": {"point": _obj({"x": AGE, "y": AGE})},
        **_obj({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}),
    },
    "allOf": {"allOf": [_obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}}, ["a"]), {"required": ["b"]}]},
    "tuple (prefixItems)": {
        "type": "array",
        "prefixItems": [AGE, {"enum": ["x", "y"]}, {"type": "boolean"}],
        "items": False,
    },
    "booleans and null": _obj({"t": {"type": "boolean"}, "n": {"type": "null"}}),
}
