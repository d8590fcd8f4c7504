"""The public names of jaxnorm and the parameters each one must document.

Shared by the Sphinx extension that generates the API reference (``jaxnorm_api.py``) and by
the tests (``tests/test_docstrings.py``, ``tests/test_docs.py``), so the reference, the
docstring check and the example check always see the same set of names.

Public names of a module: its ``__all__`` when it has one, else every name not starting
with ``_`` bound to a class or function defined in that module.

Parameters to document (Google style, as napoleon reads them):

* a function: every parameter of its signature, in its ``Args:`` section;
* a Flax Linen module (a dataclass): every field except Flax's own ``parent`` and ``name``,
  in an ``Args:`` or ``Attributes:`` section of the class docstring (or of the docstring of
  the jaxnorm base class that declares the field);
* another dataclass or a ``NamedTuple``: its fields, likewise;
* an Equinox module (a dataclass too, but built through its ``__init__``, as Flax NNX
  modules are): every ``__init__`` parameter, like any other class;
* any other class (Flax NNX modules included): every ``__init__`` parameter except ``self``
  — ``rngs`` included, as a user passes it — in the ``Args:`` section of the class or of
  ``__init__``; a class whose ``__init__`` comes from outside jaxnorm (an exception) has none;
* ``__call__`` and every public method a jaxnorm class defines: its parameters except
  ``self``, in that method's ``Args:`` section (reported as ``Class.method``).

A missing docstring is reported as the parameter ``(docstring)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
from collections.abc import Iterator
from typing import Any

# jaxnorm.equinox needs the optional Equinox (``jaxnorm[equinox]``, in the test and docs
# extras); without it the module is left out rather than failing the import.
PUBLIC_MODULES = ("jaxnorm", "jaxnorm.linen", "jaxnorm.nnx") + (
    ("jaxnorm.equinox",) if importlib.util.find_spec("equinox") is not None else ()
)
FLAX_MODULE_FIELDS = frozenset({"parent", "name"})
NO_DOCSTRING = "(docstring)"

# The section headers napoleon renders as parameter or attribute lists.
PARAMETER_SECTIONS = (
    "Args",
    "Arguments",
    "Parameters",
    "Attributes",
    "Keyword Args",
    "Keyword Arguments",
    "Other Parameters",
)
# A header may carry a qualifier ("Attributes beyond Flax's:"); the Sphinx extension
# renders it as the bare section, so the check and the rendering agree.
SECTION_HEADER = re.compile(
    rf"^(?P<indent>\s*)(?P<section>{'|'.join(PARAMETER_SECTIONS)})(?: [^:\n]+)?:\s*$"
)
_ENTRY = re.compile(r"^\*{0,2}(?P<name>\w+)\s*(?:\([^)]*\))?\s*:")


def public_names(module_name: str) -> list[tuple[str, Any]]:
    """``(qualified name, object)`` of every public name of ``module_name``, in order."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = sorted(
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == module_name
        )
    return [(f"{module_name}.{name}", getattr(module, name)) for name in names]


def all_public_names() -> list[tuple[str, Any]]:
    """The public names of every module in ``PUBLIC_MODULES``."""
    return [entry for module in PUBLIC_MODULES for entry in public_names(module)]


def documented_parameters(docstring: str | None) -> set[str]:
    """The names listed in the Google-style parameter sections of ``docstring``."""
    documented: set[str] = set()
    lines = inspect.cleandoc(docstring or "").splitlines()
    index = 0
    while index < len(lines):
        header = SECTION_HEADER.match(lines[index])
        index += 1
        if header is None:
            continue
        header_indent = len(header.group("indent"))
        entry_indent = None
        while index < len(lines):
            line = lines[index]
            indent = len(line) - len(line.lstrip())
            if line.strip() and indent <= header_indent:
                break
            if line.strip():
                entry_indent = indent if entry_indent is None else entry_indent
                entry = _ENTRY.match(line.strip())
                if indent == entry_indent and entry is not None:
                    documented.add(entry.group("name"))
            index += 1
    return documented


def _signature_parameters(function: Any) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    return [name for name in signature.parameters if name not in ("self", "cls")]


def _defined_in_jaxnorm(value: Any) -> bool:
    return getattr(value, "__module__", "").split(".")[0] == "jaxnorm"


def _jaxnorm_classes(cls: type) -> list[type]:
    return [base for base in cls.__mro__ if _defined_in_jaxnorm(base)]


def _is_linen_module(cls: type) -> bool:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return issubclass(cls, nn.Module)


def _is_equinox_module(cls: type) -> bool:
    try:
        import equinox as eqx
    except ImportError:
        return False
    return issubclass(cls, eqx.Module)


def _constructor_parameters(cls: type) -> list[str]:
    if dataclasses.is_dataclass(cls) and not _is_equinox_module(cls):
        names = [field.name for field in dataclasses.fields(cls)]
        return [n for n in names if not (_is_linen_module(cls) and n in FLAX_MODULE_FIELDS)]
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return list(cls._fields)
    init = next((base.__dict__["__init__"] for base in cls.__mro__ if "__init__" in base.__dict__),
                None)
    if init is None or not _defined_in_jaxnorm(init):
        return []
    return _signature_parameters(init)


def _own_doc(value: Any) -> str | None:
    doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
    return doc if isinstance(doc, str) else None


def _class_documentation(cls: type) -> tuple[bool, set[str]]:
    """Whether ``cls`` has its own docstring, and the parameters documented for its
    constructor in the docstrings of it, its jaxnorm bases and their ``__init__``."""
    documented: set[str] = set()
    for base in _jaxnorm_classes(cls):
        documented |= documented_parameters(_own_doc(base))
        init = base.__dict__.get("__init__")
        if init is not None:
            documented |= documented_parameters(init.__doc__)
    doc = _own_doc(cls)
    # dataclasses write a signature as the docstring of a class without one
    has_doc = bool(doc) and not doc.startswith(f"{cls.__name__}(")
    return has_doc, documented


def _methods(cls: type) -> Iterator[tuple[str, Any]]:
    """``__call__`` and the public methods ``cls`` itself defines (not field defaults such
    as a Linen module's ``scale_init``)."""
    for name, value in cls.__dict__.items():
        if (
            (name == "__call__" or not name.startswith("_"))
            and inspect.isfunction(value)
            and value.__qualname__ == f"{cls.__qualname__}.{name}"
        ):
            yield name, value


def method_names(cls: type) -> list[str]:
    """``__call__`` and the public methods of ``cls`` and its jaxnorm bases, in order: the
    members its API page documents."""
    names: list[str] = []
    for base in reversed(_jaxnorm_classes(cls)):
        names += [name for name, _ in _methods(base) if name not in names]
    return names


def _gaps_of_callable(name: str, function: Any) -> Iterator[tuple[str, str]]:
    doc = function.__doc__
    if not doc:
        yield (name, NO_DOCSTRING)
    documented = documented_parameters(doc)
    for parameter in _signature_parameters(function):
        if parameter not in documented:
            yield (name, parameter)


def undocumented(name: str, value: Any) -> Iterator[tuple[str, str]]:
    """``(name, parameter)`` for each parameter of the public ``value`` its docstrings miss."""
    if not inspect.isclass(value):
        yield from _gaps_of_callable(name, value)
        return
    has_doc, documented = _class_documentation(value)
    if not has_doc:
        yield (name, NO_DOCSTRING)
    for parameter in _constructor_parameters(value):
        if parameter not in documented:
            yield (name, parameter)
    for method_name, method in _methods(value):
        yield from _gaps_of_callable(f"{name}.{method_name}", method)


def all_undocumented() -> set[tuple[str, str]]:
    """Every ``(name, parameter)`` gap over all public names."""
    return {gap for name, value in all_public_names() for gap in undocumented(name, value)}
