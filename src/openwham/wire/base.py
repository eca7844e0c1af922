"""Base classes shared by every wire model.

WHAM is an internal, unversioned API: chatgpt.com adds fields without notice. Models therefore
keep unknown fields (``extra="allow"``) and re-emit them, so that parsing and re-serialising
with ``model_dump(mode="json", by_alias=True, exclude_unset=True)`` gives back the input.
"""

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class WireModel(BaseModel):
    """Lenient model: unknown fields are kept and serialised again.

    ``omit_when_unset`` (only on an :class:`OmittingWireModel`) names rarely-seen keys that are
    left out of the output unless they were given (explicit nulls from chatgpt.com still
    round-trip; openwham's own output stays the captured shape).
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    omit_when_unset: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("omit_when_unset") and not issubclass(cls, OmittingWireModel):
            raise TypeError(f"{cls.__name__} sets omit_when_unset: derive OmittingWireModel")


class OmittingWireModel(WireModel):
    """A wire model with ``omit_when_unset`` keys. Only these models carry the Python
    serializer that drops them: on every model it made serialising a task (hundreds of nested
    models) several times slower than pydantic-core alone."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if self.omit_when_unset and isinstance(data, dict):
            for key in self.omit_when_unset:
                if key not in self.model_fields_set and data.get(key) is None:
                    data.pop(key, None)
        return data


class StrictWireModel(BaseModel):
    """Strict model for openwham's own request bodies: a misspelt field is a 4xx, not a no-op."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class UnknownObject(WireModel):
    """An item or fragment of a kind this package does not model; every field is kept as is."""


def tag_value(value: Any, key: str) -> Any:
    """Read ``key`` from a raw dict or a model, for callable union discriminators.

    Pydantic calls discriminators both when validating (dicts) and when serialising (models).
    """
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)
