"""torch, imported on first use.

Every process that holds a Ray handle of a PS shard or a trainer imports the module of the
actor's class: Ray unpickles the class to build the handle (``ray.get_actor``, or a handle
passed in). A Serve replica and the ``freshet`` commands hold such handles but never run torch
code, and importing torch at the top of those modules cost each of them ~1.4 s of CPU at start
and ~180 MiB of memory for its whole life (BENCHMARKS.md section 8). Those modules import
:data:`torch` from here instead: the real module is imported the first time one of its
attributes is read, which a shard or trainer does as it starts.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["LazyModule", "torch"]


class LazyModule:
    """Stands in for module ``name`` until an attribute of it is read, then imports it.

    Each attribute read is kept on this object, so later reads cost what a module attribute
    read costs. ``importlib.import_module`` makes a thread that reads an attribute while
    another is still importing the module wait for that import to finish. Dunder names
    (``__version__``) are not forwarded, since ``copy``, ``pickle`` and ``inspect`` probe any
    object for them: read them from :meth:`module`.

    Raises:
        ModuleNotFoundError: on the first attribute read, when ``name`` is not installed.
    """

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str) -> Any:  # only for attributes not kept yet
        if attr.startswith("__"):  # copy, pickle and inspect probe these; they are not torch's
            raise AttributeError(attr)
        value = getattr(self.module(), attr)
        self.__dict__[attr] = value
        return value

    def module(self) -> ModuleType:
        """The real module, imported now if it was not yet."""
        return importlib.import_module(self.__dict__["_name"])

    def __repr__(self) -> str:
        return f"<lazily imported module {self.__dict__['_name']!r}>"


torch: Any = LazyModule("torch")
"""``torch``, imported by the first attribute read (``torch.zeros``, ``torch.Tensor``)."""
