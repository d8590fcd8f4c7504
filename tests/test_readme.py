"""Every ```python block of README.md runs, so the usage snippets cannot rot.

Each block is self-contained and executed in a fresh namespace. A block whose first line
is ``# not run: <reason>`` is shown but skipped (only the multi-process one).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
NOT_RUN = "# not run:"


def python_blocks() -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block in the README."""
    text = README.read_text()
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(1))
        for match in PYTHON_BLOCK.finditer(text)
    ]


BLOCKS = python_blocks()


def test_readme_has_a_snippet_for_every_usage_section() -> None:
    code = "\n".join(block for _, block in BLOCKS)
    for api in (
        "jaxnorm.batch_norm(",
        "jaxnorm.moments(",
        "from jaxnorm import linen",
        "from jaxnorm import nnx",
        "from jaxnorm import equinox",
        "jax.pmap(",
        "jax.shard_map",
        "jax.distributed.initialize(",
        "unbiased_running_var=True",
        "jaxnorm.fold_batch_norm(",
        "jaxnorm.recompute_batch_stats(",
    ):
        assert api in code, api
    skipped = [block for _, block in BLOCKS if block.startswith(NOT_RUN)]
    assert len(skipped) == 1 and "jax.distributed.initialize(" in skipped[0]


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line: int, code: str) -> None:
    if code.startswith(NOT_RUN):
        pytest.skip(code.splitlines()[0].removeprefix("# "))
    # a registered module, as a script would be: dataclasses (Flax modules) look it up
    module = types.ModuleType(f"readme_line{line}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, f"README.md:{line}", "exec"), module.__dict__)  # noqa: S102
    finally:
        del sys.modules[module.__name__]
