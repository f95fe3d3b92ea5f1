"""Structural OpenAPI v3 schemas (as Kubernetes CRDs need them) from the typed API models.

pydantic's own `model_json_schema()` emits `$ref`, `anyOf` with `null`, `title` and `const`,
none of which a structural CRD schema allows. This module walks the models' fields instead and
maps each Python type onto the one schema node Kubernetes expects. What Python cannot say
(CEL rules, formats, list and map merge semantics) rides along as `Kube` metadata, either in a
field's `Annotated[...]` or, for a whole object, in the model's `kube_schema` class variable.
"""

from __future__ import annotations

import enum
import inspect
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

Schema = dict[str, Any]
Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired",
                 "FieldValueDuplicate"]


@dataclass(frozen=True)
class Rule:
    """One CEL rule (`x-kubernetes-validations` entry) on the node it is attached to."""

    rule: str
    message: str | None = None
    message_expression: str | None = None
    field_path: str | None = None  # reported path, relative to the node (".minSites")
    reason: Reason | None = None

    def render(self) -> Schema:
        """The rule as the CRD schema spells it."""
        out: Schema = {"rule": self.rule}
        if self.message is not None:
            out["message"] = self.message
        if self.message_expression is not None:
            out["messageExpression"] = self.message_expression
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Kube:
    """Kubernetes-only facts about a schema node that a Python type cannot carry."""

    rules: tuple[Rule, ...] = ()
    format: str | None = None
    list_type: Literal["atomic", "set", "map"] | None = None
    list_map_keys: tuple[str, ...] = ()
    map_type: Literal["atomic", "granular"] | None = None
    preserve_unknown_fields: bool = False

    def apply(self, node: Schema) -> None:
        """Write these facts into a schema node."""
        if self.format:
            node["format"] = self.format
        if self.list_type:
            node["x-kubernetes-list-type"] = self.list_type
        if self.list_map_keys:
            node["x-kubernetes-list-map-keys"] = list(self.list_map_keys)
        if self.map_type:
            node["x-kubernetes-map-type"] = self.map_type
        if self.preserve_unknown_fields:
            node["x-kubernetes-preserve-unknown-fields"] = True
        if self.rules:
            node.setdefault("x-kubernetes-validations", []).extend(r.render() for r in self.rules)


class ApiModel(BaseModel):
    """Base of every spec and status model: camelCase on the wire, snake_case in Python.

    Parse an object's `spec` with `Model.model_validate(obj["spec"])`; write one back with
    `model.model_dump(exclude_none=True)` (aliases are used by default).
    """

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True, extra="forbid")
    # Object-level CEL rules and other facts for this model's schema node.
    kube_schema: ClassVar[Kube] = Kube()


class SchemaError(TypeError):
    """A model uses a type or default that has no structural schema."""


def describe(model: type[BaseModel]) -> str:
    """A model's description: its docstring, first paragraph kept verbatim, dedented."""
    doc = model.__dict__.get("__doc__")
    if not doc:
        raise SchemaError(f"{model.__name__} needs a docstring: it documents `kubectl explain`")
    return inspect.cleandoc(doc)


def object_schema(model: type[BaseModel]) -> Schema:
    """The structural schema of a model: properties in declaration order, required, rules."""
    props: Schema = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        # pydantic has already moved a field's top-level Annotated facts into info.metadata.
        node = _type_schema(info.annotation, list(info.metadata), f"{model.__name__}.{name}")
        description = info.description or node.get("description")
        if not description:
            raise SchemaError(f"{model.__name__}.{name} needs a description")
        node = {"description": description, **{k: v for k, v in node.items()
                                               if k != "description"}}
        default = _default(info)
        if default is not None:
            node["default"] = default
        if info.is_required():
            required.append(key)
        props[key] = node
    out: Schema = {"description": describe(model), "type": "object", "properties": props}
    if required:
        out["required"] = required
    kube = getattr(model, "kube_schema", None)
    if isinstance(kube, Kube):
        kube.apply(out)
    return out


def _default(info: FieldInfo) -> Any:
    """The CRD default of a field, or None. A nested model defaults to its defaulted fields
    spelled out: the API server checks a default against the CEL rules without filling in
    the nested defaults first."""
    factory = info.default_factory
    if factory is not None:
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return factory().model_dump(mode="json", exclude_none=True)
        return None  # empty lists and maps need no default on the server
    value = info.default
    if value is PydanticUndefined or value is None:
        return None
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, BaseModel):
        raise SchemaError(f"use default_factory for model defaults, not {value!r}")
    return value


def _flatten(metadata: Iterable[Any]) -> list[Any]:
    """Constraint objects, with FieldInfo instances (Field(...) inside Annotated) opened up."""
    out: list[Any] = []
    for m in metadata:
        if isinstance(m, FieldInfo):
            out.extend(m.metadata)
            if m.description:
                out.append(_Description(m.description))
        else:
            out.append(m)
    return out


@dataclass(frozen=True)
class _Description:
    text: str


_SCALARS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_schema(tp: Any, metadata: list[Any], where: str) -> Schema:
    """Schema node of one annotation; `metadata` are constraints from outer Annotated layers."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *inner = get_args(tp)
        # Inner (type alias) facts first, so that a field's own constraints override them.
        return _type_schema(base, [*_flatten(inner), *_flatten(metadata)], where)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise SchemaError(f"{where}: unions other than `X | None` are not structural")
        return _type_schema(args[0], metadata, where)
    node: Schema
    if origin is Literal:
        values = list(get_args(tp))
        if not all(isinstance(v, str) for v in values):
            raise SchemaError(f"{where}: Literal values must be strings")
        node = {"type": "string", "enum": values}
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        node = {"type": "string", "enum": [m.value for m in tp]}
    elif tp in _SCALARS:
        node = {"type": _SCALARS[tp]}
    elif origin is list:
        (item,) = get_args(tp)
        node = {"type": "array", "items": _type_schema(item, [], f"{where}[]")}
    elif origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise SchemaError(f"{where}: map keys must be strings")
        node = {"type": "object"}
        if value is Any:
            node["x-kubernetes-preserve-unknown-fields"] = True
        else:
            node["additionalProperties"] = _type_schema(value, [], f"{where}{{}}")
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        node = object_schema(tp)
    else:
        raise SchemaError(f"{where}: no structural schema for {tp!r}")
    for m in metadata:
        _constrain(node, m, where)
    return node


def _constrain(node: Schema, m: Any, where: str) -> None:
    """Apply one constraint object (annotated_types, pydantic pattern, Kube) to a node."""
    kind = node["type"]
    size_keys = {"string": ("minLength", "maxLength"), "array": ("minItems", "maxItems"),
                 "object": ("minProperties", "maxProperties")}
    if isinstance(m, Kube):
        m.apply(node)
    elif isinstance(m, _Description):
        node["description"] = m.text
    elif isinstance(m, at.Ge):
        node["minimum"] = m.ge
    elif isinstance(m, at.Gt):
        node["minimum"], node["exclusiveMinimum"] = m.gt, True
    elif isinstance(m, at.Le):
        node["maximum"] = m.le
    elif isinstance(m, at.Lt):
        node["maximum"], node["exclusiveMaximum"] = m.lt, True
    elif isinstance(m, at.MinLen) and kind in size_keys:
        node[size_keys[kind][0]] = m.min_length
    elif isinstance(m, at.MaxLen) and kind in size_keys:
        node[size_keys[kind][1]] = m.max_length
    elif getattr(m, "pattern", None) is not None and kind == "string":
        node["pattern"] = m.pattern
    else:
        raise SchemaError(f"{where}: constraint {m!r} has no schema form on a {kind}")


# ---- kinds ------------------------------------------------------------------------------------

ColumnType = Literal["string", "integer", "number", "boolean", "date"]


@dataclass(frozen=True)
class PrinterColumn:
    """One column of `kubectl get` (additionalPrinterColumns)."""

    name: str
    type: ColumnType
    json_path: str
    description: str
    priority: int = 0  # 1: shown only with -o wide

    def render(self) -> Schema:
        """The column as the CRD spells it."""
        out: Schema = {"name": self.name, "type": self.type, "jsonPath": self.json_path,
                       "description": self.description}
        if self.priority:
            out["priority"] = self.priority
        return out


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp",
                    "Time since the object was created.")


@dataclass(frozen=True)
class Kind:
    """Everything the CRD of one kind says: names, scope, the typed spec and status, the
    limit on metadata.name, object-level CEL rules and printer columns."""

    kind: str
    plural: str
    scope: Literal["Namespaced", "Cluster"]
    spec: type[ApiModel]
    status: type[ApiModel]
    description: str
    name_max: int
    short_names: tuple[str, ...] = ()
    columns: tuple[PrinterColumn, ...] = ()
    rules: tuple[Rule, ...] = ()  # on the whole object: self.spec, self.status, oldSelf
    selectable_fields: tuple[str, ...] = ()

    @property
    def singular(self) -> str:
        """The lower-case singular name (`kubectl get hospitalsite`)."""
        return self.kind.lower()
