"""Every parameter of every public function and class is documented — or listed here.

The check (``docs/_ext/public_api.py``) introspects each public name of ``jaxnorm``,
``jaxnorm.linen`` and ``jaxnorm.nnx`` and reads its Google-style ``Args:`` /
``Attributes:`` sections (the rule for functions, Linen dataclass fields, NNX ``__init__``
parameters with ``rngs``, and ``__call__``/public methods is in that module's docstring).

``KNOWN_UNDOCUMENTED`` is what was missing when the check was written. The test fails when
a new gap appears (document it) and when a listed gap has been filled (delete it from the
list), so the list only shrinks. ``python tests/test_docstrings.py`` prints the current gaps
in this file's format.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS_EXT = Path(__file__).resolve().parents[1] / "docs" / "_ext"
sys.path.insert(0, str(DOCS_EXT))

from public_api import (
    NO_DOCSTRING,
    all_public_names,
    all_undocumented,
    documented_parameters,
    undocumented,
)

# name -> the parameters its docstrings do not document yet (space-separated)
_KNOWN_UNDOCUMENTED_BY_NAME = {
}
KNOWN_UNDOCUMENTED = frozenset(
    (name, parameter)
    for name, parameters in _KNOWN_UNDOCUMENTED_BY_NAME.items()
    for parameter in parameters.split()
)


def format_gaps(gaps: set[tuple[str, str]]) -> str:
    """``gaps`` as entries of ``_KNOWN_UNDOCUMENTED_BY_NAME``, lines within 100 characters."""
    by_name: dict[str, list[str]] = {}
    for name, parameter in sorted(gaps):
        by_name.setdefault(name, []).append(parameter)
    lines = []
    for name, parameters in by_name.items():
        line = f'    "{name}": "{" ".join(parameters)}",'
        if len(line) <= 100:
            lines.append(line)
            continue
        lines.append(f'    "{name}": (')
        chunk: list[str] = []
        for parameter in parameters:
            if chunk and len(" ".join([*chunk, parameter])) > 84:
                lines.append(f'        "{" ".join(chunk)} "')
                chunk = []
            chunk.append(parameter)
        lines += [f'        "{" ".join(chunk)}"', "    ),"]
    return "\n".join(lines)


def test_no_new_undocumented_parameter() -> None:
    new = all_undocumented() - KNOWN_UNDOCUMENTED
    assert not new, (
        "document these parameters in an Args: (or Attributes:) section:\n" + format_gaps(new)
    )


def test_known_gaps_that_are_now_documented_leave_the_list() -> None:
    fixed = KNOWN_UNDOCUMENTED - all_undocumented()
    assert not fixed, (
        "now documented (or no longer public): delete from KNOWN_UNDOCUMENTED in "
        "tests/test_docstrings.py:\n" + format_gaps(set(fixed))
    )


def test_the_check_sees_every_public_module() -> None:
    names = {name for name, _ in all_public_names()}
    assert {"jaxnorm.batch_norm", "jaxnorm.linen.BatchNorm", "jaxnorm.nnx.BatchNorm"} <= names


def test_args_section_parsing() -> None:
    doc = """Summary line.

    Args:
      x: the input; ``y: z`` inside a description is no entry.
        A continuation line: not an entry either.
      scale (Array): with a type.
      *args: starred.

    Attributes beyond Flax's:
      momentum: a qualified header counts.

    Returns:
      value: not a parameter section.
    """
    assert documented_parameters(doc) == {"x", "scale", "args", "momentum"}
    assert documented_parameters("x: not in a section") == set()
    assert documented_parameters(None) == set()


def test_check_reports_a_missing_parameter_and_a_missing_docstring() -> None:
    def documented(x: int, y: int) -> int:
        """Adds.

        Args:
          x: one.
        """
        return x + y

    def bare(x: int) -> int:
        return x

    assert set(undocumented("documented", documented)) == {("documented", "y")}
    assert set(undocumented("bare", bare)) == {("bare", NO_DOCSTRING), ("bare", "x")}


if __name__ == "__main__":
    print(format_gaps(all_undocumented()))
