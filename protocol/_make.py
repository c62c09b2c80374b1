"""Building a message from its fields' values, faster than its ``__init__``.

A frozen dataclass's ``__init__`` sets each field with
``object.__setattr__``, which looks the field up again each time; with slots
the field's own descriptor sets it directly, in 60% of the time (for a
4-field message, 0.30 µs rather than 0.49). Decoders build every message
this way (``_derive`` generates it inline), only where that is all
``__init__`` would do: slots, and no ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["construct_lines", "constructor"]

_M = TypeVar("_M")


def construct_lines(cls: type[Any], args: list[str], namespace: dict[str, Any]) -> list[str]:
    """Source lines that return a ``cls`` of ``args`` (all its fields' values, in order).

    The names they use go into ``namespace``: ``cls``, ``new``, ``set_0``...
    """
    names = [f.name for f in dataclasses.fields(cls)]
    slots: list[Any] = [getattr(cls, n, None) for n in names]
    if hasattr(cls, "__post_init__") or not all(
        type(d) is types.MemberDescriptorType for d in slots
    ):
        namespace["cls"] = cls
        return [f"    return cls({', '.join(args)})"]
    namespace["new"], namespace["cls"] = object.__new__, cls
    lines = ["    o = new(cls)"]
    for j, (descriptor, arg) in enumerate(zip(slots, args, strict=True)):
        namespace[f"set_{j}"] = descriptor.__set__
        lines.append(f"    set_{j}(o, {arg})")
    return [*lines, "    return o"]


def constructor(cls: type[_M]) -> Callable[..., _M]:
    """A function building ``cls`` from all its fields' values, in order, as decoders do."""
    names = [f"a{j}" for j in range(len(dataclasses.fields(cls)))]  # type: ignore[arg-type]
    namespace: dict[str, Any] = {}
    lines = [f"def make({', '.join(names)}):", *construct_lines(cls, names, namespace)]
    exec("\n".join(lines) + "\n", namespace)
    make: Callable[..., _M] = namespace["make"]
    return make
