"""Hostile but well-typed protobuf messages for any message type, as hypothesis strategies: every scalar at its
type's extremes and beyond the values a service expects (negative counts, NaN and infinities, huge ids, long or
odd strings, unknown enum numbers), nested messages to a bounded depth, short repeated fields."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

INT_EDGES = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
             F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
             F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
             F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1)}
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "127.0.0.1:1", "../../etc/passwd", "x" * 5000,
                                                         "kvmesh-1-ab", "\x00", "🙂" * 50, "decode", "llama"]))


def _repeated(field) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; `label` before
    return bool(is_repeated) if is_repeated is not None else field.label == F.LABEL_REPEATED


def _scalar(field):
    if field.type in INT_EDGES:
        lo, hi = INT_EDGES[field.type]
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, -1 if lo < 0 else 2, 16]),
                         st.integers(-3, 100).filter(lambda v: lo <= v <= hi))
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        width = 32 if field.type == F.TYPE_FLOAT else 64
        return st.one_of(st.floats(width=width), st.sampled_from([0.0, -1.0, 1e30 if width == 64 else 3e38]))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        return TEXT
    if field.type == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=48), st.just(b"\0" * 4096))
    if field.type == F.TYPE_ENUM:
        return st.integers(-3, 12)
    raise TypeError(field.type)


def messages(descriptor, cls_of, depth: int = 2):
    """A strategy of instances of the message `descriptor` (cls_of(descriptor) gives its Python class)."""
    fields = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry or depth <= 0:
                continue
            value = messages(field.message_type, cls_of, depth - 1)
        else:
            value = _scalar(field)
        if _repeated(field):
            value = st.lists(value, max_size=3)
        fields[field.name] = st.one_of(st.none(), value)

    @st.composite
    def build(draw):
        message = cls_of(descriptor)()
        for name, strategy in fields.items():
            value = draw(strategy)
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            target = getattr(message, name)
            if _repeated(field) and field.type == F.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            elif _repeated(field):
                target.extend(value)
            elif field.type == F.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message
    return build()
