"""A fast yes/no check of one event against Amazon's CreateEvent schema.

``app.amazon.schema.request_errors`` is the authority, but jsonschema spends about
0.3 ms per event, which would make the emulator the bottleneck of every benchmark.
This module compiles the same OpenAPI schema once into plain Python closures that
answer only "valid or not" in a few microseconds. The emulator asks it first and
calls ``request_errors`` only for events it refuses, to get Amazon-style messages;
if the two ever disagree, ``request_errors`` wins (see ``validation.event_errors``).

Only the keywords the schema uses are supported. Any other keyword makes
compilation fail loudly, so a newer schema can never be accepted silently.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from app.amazon import schema

Check = Callable[[Any], bool]

_REF_PREFIX = "#/components/schemas/"
# Keywords that never change validity under Draft 4 without a format checker,
# which is how request_errors validates.
_ANNOTATIONS = frozenset({"description", "format", "title", "example", "examples", "default"})
_SUPPORTED = frozenset(
    {"type", "enum", "pattern", "properties", "required", "items", "minItems", "maxItems"}
)


def _is_integer(value: Any) -> bool:
    # Draft 4 integers are ints only (1.0 is not one), and JSON has no bool-as-int.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPES: dict[str, Check] = {
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
}


class SchemaCompiler:
    """Turns schema nodes into checks; ``$ref`` targets are compiled once each."""

    def __init__(self, schemas: Mapping[str, Any]) -> None:
        self._schemas = schemas
        self._compiled: dict[str, Check] = {}

    def reference(self, name: str) -> Check:
        if name not in self._compiled:
            # A placeholder first, so a schema that refers to itself terminates.
            cell: list[Check] = []
            self._compiled[name] = lambda value: cell[0](value)
            cell.append(self.compile(self._schemas[name]))
            self._compiled[name] = cell[0]
        return self._compiled[name]

    def compile(self, node: Mapping[str, Any]) -> Check:
        if "$ref" in node:
            # Draft 4: a $ref replaces every sibling keyword.
            ref = node["$ref"]
            if not ref.startswith(_REF_PREFIX):
                raise NotImplementedError(f"unsupported $ref {ref!r}")
            return self.reference(ref.removeprefix(_REF_PREFIX))
        unknown = set(node) - _SUPPORTED - _ANNOTATIONS
        if unknown:
            raise NotImplementedError(f"unsupported schema keywords {sorted(unknown)}")
        type_check = _type_check(node)
        kind = node.get("type")
        # A node's type keyword is folded into the keyword check that tests the same
        # type anyway (one call per node instead of two; this runs for every field of
        # every event): an object or array check refuses other types itself, an enum of
        # strings refuses non-strings, a string pattern takes a string check.
        object_check = self._object_check(node, typed=kind == "object")
        array_check = self._array_check(node, typed=kind == "array")
        enum_check = _enum_check(node)
        pattern_check = _pattern_check(node, typed=kind == "string")
        if (
            (kind == "object" and object_check is not None)
            or (kind == "array" and array_check is not None)
            or (kind == "string" and (enum_check is not None or pattern_check is not None))
        ):
            type_check = None
        checks = [
            check
            for check in (type_check, enum_check, pattern_check, object_check, array_check)
            if check is not None
        ]
        return _all_of(checks)

    def _object_check(self, node: Mapping[str, Any], *, typed: bool) -> Check | None:
        """``typed``: the node's type is object, so anything else is refused here."""
        if "properties" not in node and "required" not in node:
            return None
        properties = {name: self.compile(sub) for name, sub in node.get("properties", {}).items()}
        required = frozenset(node.get("required", ()))

        # Plain loops, not all(<generator>): this runs for every event and field.
        def check(value: Any) -> bool:
            if not isinstance(value, dict):
                return not typed  # untyped: the keyword does not apply to a non-object
            if not required <= value.keys():
                return False
            for name, item in value.items():
                sub = properties.get(name)
                if sub is not None and not sub(item):
                    return False
            return True

        return check

    def _array_check(self, node: Mapping[str, Any], *, typed: bool) -> Check | None:
        """``typed``: the node's type is array, so anything else is refused here."""
        items = node.get("items")
        if items is not None and not isinstance(items, Mapping):
            raise NotImplementedError("tuple-form items")
        item_check = self.compile(items) if items is not None else None
        low = node.get("minItems", 0)
        high = node.get("maxItems")
        if item_check is None and low == 0 and high is None:
            return None

        def check(value: Any) -> bool:
            if not isinstance(value, list):
                return not typed
            if len(value) < low or (high is not None and len(value) > high):
                return False
            if item_check is not None:
                for item in value:
                    if not item_check(item):
                        return False
            return True

        return check


def _type_check(node: Mapping[str, Any]) -> Check | None:
    name = node.get("type")
    if name is None:
        return None
    if name not in _TYPES:
        raise NotImplementedError(f"unsupported type {name!r}")
    return _TYPES[name]


def _enum_check(node: Mapping[str, Any]) -> Check | None:
    if "enum" not in node:
        return None
    allowed = frozenset(node["enum"])
    if not all(isinstance(member, str) for member in allowed):
        raise NotImplementedError("enum with non-string members")
    # A set lookup gives jsonschema's answer because every member is a string.
    return lambda value: isinstance(value, str) and value in allowed


def _pattern_check(node: Mapping[str, Any], *, typed: bool = False) -> Check | None:
    """``typed``: the node's type is string, so anything else is refused here."""
    if "pattern" not in node:
        return None
    # jsonschema uses re.search: the pattern may match anywhere in the string.
    search = re.compile(node["pattern"]).search
    if typed:
        return lambda value: isinstance(value, str) and search(value) is not None
    return lambda value: not isinstance(value, str) or search(value) is not None


def _all_of(checks: list[Check]) -> Check:
    if not checks:
        return lambda value: True
    if len(checks) == 1:
        return checks[0]

    def check_all(value: Any) -> bool:
        for check in checks:  # noqa: SIM110 - a loop is twice as fast as all(<generator>)
            if not check(value):
                return False
        return True

    return check_all


def _prose_rules_hold(event: dict[str, Any]) -> bool:
    """The rules request_errors adds to the schema: keep in step with it."""
    description = event["eventDescription"]
    name = description.get("dataSetName")
    if name is not None and not schema.DATA_SET_NAME.fullmatch(name):
        return False
    return schema.EVENT_TIME.fullmatch(event["eventTime"]) is not None


@functools.cache
def event_check() -> Check:
    """True only for events that request_errors would find no fault with."""
    schemas = schema.openapi()["components"]["schemas"]
    schema_check = SchemaCompiler(schemas).reference("EventCreate")

    def check(event: Any) -> bool:
        # The prose rules assume the schema's shapes, so they run second.
        return schema_check(event) and _prose_rules_hold(event)

    return check
