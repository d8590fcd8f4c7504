"""Sphinx extension: the API reference and the benchmark tables, generated at build time.

* ``api/``: one page per public name of every module in ``public_api.PUBLIC_MODULES``
  (from ``__all__``, so a new export appears without an edit here), one page per module
  with a summary table, and ``api/index``. A page includes ``api_examples/<name>.rst``
  when that file exists (the runnable example; ``tests/test_docs.py`` runs it).
* ``_generated/benchmark_tables.md``: every ``benchmarks/results*.json`` as tables, so
  the performance guide shows what the committed result files hold.
* ``_generated/stability_table.md``: the output of ``python benchmarks/stability.py``
  (a few seconds on a CPU), so the numerics guide shows the current code's errors.
* A qualified docstring section header (``Attributes beyond Flax's:``) is rendered as the
  bare napoleon section (``Attributes:``), as ``public_api`` reads it.
* Class signatures: a Flax Linen module shows its fields without Flax's ``parent``/``name``,
  with defaults written as names (``zeros``, ``float32``) instead of reprs with addresses;
  a Flax NNX module (whose metaclass shows ``(*args, **kwargs)``) its ``__init__``.

Generated files are rewritten only when their text changes, so incremental builds stay
incremental. ``api/`` and ``_generated/`` are build products (``docs/.gitignore``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from public_api import (
    FLAX_MODULE_FIELDS,
    PUBLIC_MODULES,
    SECTION_HEADER,
    method_names,
    public_names,
)
from sphinx.application import Sphinx

DOCS = Path(__file__).resolve().parents[1]
API_DIR = DOCS / "api"
EXAMPLES_DIR = DOCS / "api_examples"
GENERATED_DIR = DOCS / "_generated"
BENCHMARKS_DIR = DOCS.parent / "benchmarks"

MODULE_TITLES = {
    "jaxnorm": "Functional core",
    "jaxnorm.linen": "Flax Linen modules",
    "jaxnorm.nnx": "Flax NNX modules",
    "jaxnorm.equinox": "Equinox layers",
}


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _title(text: str, underline: str = "=") -> str:
    return f"{text}\n{underline * len(text)}\n"


def example_path(qualified_name: str) -> Path:
    """The runnable example page section of a public name."""
    return EXAMPLES_DIR / f"{qualified_name}.rst"


def _name_page(qualified_name: str, value: Any) -> str:
    module, _, name = qualified_name.rpartition(".")
    if inspect.isclass(value):
        # the call and the public methods; not a Linen module's fields (its attributes)
        methods = method_names(value)
        members = f"   :members: {', '.join(methods)}\n" if methods else ""
        body = f".. autoclass:: {name}\n{members}   :show-inheritance:\n"
    else:
        body = f".. autofunction:: {name}\n"
    text = f"{_title(qualified_name)}\n.. currentmodule:: {module}\n\n{body}"
    if example_path(qualified_name).exists():
        text += f"\n.. include:: ../api_examples/{qualified_name}.rst\n"
    return text


def _module_page(module: str, names: list[tuple[str, Any]]) -> str:
    entries = "".join(f"   {name.rpartition('.')[2]}\n" for name, _ in names)
    toctree = "".join(f"   {name}\n" for name, _ in names)
    return (
        f"{_title(f'{MODULE_TITLES.get(module, module)}: ``{module}``')}\n"
        f".. automodule:: {module}\n   :no-members:\n   :no-index:\n\n"
        f".. currentmodule:: {module}\n\n"
        f".. autosummary::\n\n{entries}\n"
        f".. toctree::\n   :hidden:\n\n{toctree}"
    )


def _index_page() -> str:
    modules = "".join(f"   {module}\n" for module in PUBLIC_MODULES)
    return (
        f"{_title('API reference')}\n"
        "Generated from each module's ``__all__`` (``jaxnorm.linen``, ``jaxnorm.nnx`` and\n"
        "``jaxnorm.equinox``: their public classes and functions). Every page shows the\n"
        "docstring with its math and a runnable example.\n\n"
        f".. toctree::\n   :maxdepth: 2\n\n{modules}"
    )


def generate_api_pages() -> None:
    """Writes ``api/index.rst``, one page per module and one per public name."""
    expected = {API_DIR / "index.rst"}
    _write_if_changed(API_DIR / "index.rst", _index_page())
    for module in PUBLIC_MODULES:
        names = public_names(module)
        _write_if_changed(API_DIR / f"{module}.rst", _module_page(module, names))
        expected.add(API_DIR / f"{module}.rst")
        for qualified_name, value in names:
            path = API_DIR / f"{qualified_name}.rst"
            _write_if_changed(path, _name_page(qualified_name, value))
            expected.add(path)
    for stale in set(API_DIR.glob("*.rst")) - expected:  # a name that is no longer public
        stale.unlink()


def _shape(shape: list[int]) -> str:
    return "×".join(str(size) for size in shape)


def nan_or(summary: dict[str, Any], key: str) -> float:
    return float(summary.get(key, float("nan")))


def _benchmark_tables(path: Path) -> str:
    result = json.loads(path.read_text())
    env, summary = result.get("environment", {}), result.get("summary", {})
    lines = [
        f"### `{path.relative_to(DOCS.parent)}`: {env.get('device', 'unknown device')}",
        "",
        (
            f"{env.get('machine', '')}; Python {env.get('python', '?')},"
            f" JAX {env.get('jax', '?')}, Flax {env.get('flax', '?')},"
            f" jaxnorm {env.get('jaxnorm', '?')}; {env.get('date', 'undated')}."
        ),
        "",
        "| layer | shape | dtype | pass | jaxnorm ms | flax ms | ratio |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in result.get("records", []):
        lines.append(
            f"| {r['layer']} | {_shape(r['shape'])} | {r['dtype']} | {r['pass']} "
            f"| {r['jaxnorm_ms']:.3f} | {r['flax_ms']:.3f} | {r['ratio']:.3f} |"
        )
    if summary:
        lines += [
            "",
            (
                f"Geometric-mean ratio **{nan_or(summary, 'geomean_ratio'):.3f}**"
                f" (forward {nan_or(summary, 'geomean_ratio_forward'):.3f},"
                f" forward+backward {nan_or(summary, 'geomean_ratio_forward+backward'):.3f});"
                f" worst case {nan_or(summary, 'max_ratio'):.3f}."
            ),
        ]
    memory = result.get("memory", [])
    if memory:
        lines += [
            "",
            "| model | dtype | jaxnorm temp MiB | flax temp MiB | ratio |",
            "|---|---|---:|---:|---:|",
        ]
        mib = 2.0**20
        for m in memory:
            lines.append(
                f"| {m['model']} | {m['dtype']} | {m['jaxnorm']['temp_bytes'] / mib:.1f} "
                f"| {m['flax']['temp_bytes'] / mib:.1f} | {m['temp_ratio']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def generate_benchmark_tables() -> None:
    """Writes ``_generated/benchmark_tables.md`` from ``benchmarks/results*.json``."""
    files = sorted(BENCHMARKS_DIR.glob("results*.json"))
    accelerator = [
        f for f in files
        if not json.loads(f.read_text()).get("environment", {}).get("device", "").startswith("cpu")
    ]
    parts = [_benchmark_tables(path) for path in files]
    if not accelerator:
        parts.append(
            "### Accelerators\n\nNo accelerator results are committed yet: every result file "
            "above was measured on a CPU. `python benchmarks/run.py --json "
            "benchmarks/results-gpu.json` on a GPU (add `--torch` for the PyTorch columns) "
            "writes one, and this page shows it on the next build.\n"
        )
    _write_if_changed(GENERATED_DIR / "benchmark_tables.md", "\n".join(parts))


def generate_stability_table() -> None:
    """Runs ``benchmarks/stability.py`` and keeps its Markdown table and closing note."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS_DIR / "stability.py")],
        capture_output=True, text=True, check=True, cwd=DOCS.parent, timeout=300,
    )
    lines = result.stdout.strip().splitlines()
    kept = [line for line in lines if line.startswith(("|", "LayerNorm:"))]
    text = "\n".join(kept[:-1] + ["", kept[-1]]) if kept else "(no output)"
    _write_if_changed(GENERATED_DIR / "stability_table.md", text + "\n")


def _default_text(value: Any) -> str:
    if inspect.isfunction(value) or inspect.isclass(value):
        return value.__name__
    return repr(value)


class _Source:
    """A default value or annotation shown as its source text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _source_defaults(function: Any) -> dict[str, str]:
    """The source text of each default of ``function`` (``zeros``, not a function repr)."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return {}
    definition = ast.parse(source).body[0]
    if not isinstance(definition, ast.FunctionDef | ast.AsyncFunctionDef):
        return {}
    arguments = definition.args
    positional = [*arguments.posonlyargs, *arguments.args]
    nodes = dict(zip([a.arg for a in positional[len(positional) - len(arguments.defaults):]],
                     arguments.defaults, strict=True))
    nodes |= {a.arg: d for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
              if d is not None}
    return {name: ast.get_source_segment(source, node) or "..." for name, node in nodes.items()}


def _init_signature(init: Any) -> str:
    """``init``'s signature without ``self``, defaults and annotations as written."""
    signature = inspect.signature(init)
    defaults = _source_defaults(init)
    parameters = []
    for parameter in list(signature.parameters.values())[1:]:
        if parameter.default is not parameter.empty:
            parameter = parameter.replace(
                default=_Source(defaults.get(parameter.name, repr(parameter.default)))
            )
        if isinstance(parameter.annotation, str):
            parameter = parameter.replace(annotation=_Source(parameter.annotation))
        parameters.append(parameter)
    return str(signature.replace(parameters=parameters, return_annotation=signature.empty))


def _linen_signature(app: Sphinx, obj: Any) -> str:
    """A Linen module's fields without Flax's ``parent``/``name``."""
    parameters = []
    for field in dataclasses.fields(obj):
        if field.name in FLAX_MODULE_FIELDS:
            continue
        text = f"{field.name}: {field.type}" if isinstance(field.type, str) else field.name
        if field.default is not dataclasses.MISSING:
            text += f" = {_default_text(field.default)}"
        parameters.append(text)
    return f"({', '.join(parameters)})"


def _class_signature(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """Constructor signatures: a Linen module's fields; for another jaxnorm class with
    its own ``__init__`` (Flax NNX modules, whose metaclass hides it behind
    ``(*args, **kwargs)``), that ``__init__``'s parameters."""
    import flax.linen as nn

    if what != "class" or not inspect.isclass(obj):
        return None
    if issubclass(obj, nn.Module):
        return _linen_signature(app, obj), return_annotation
    init = next((base.__dict__["__init__"] for base in obj.__mro__
                 if "__init__" in base.__dict__), None)
    if init is None or not getattr(init, "__module__", "").startswith("jaxnorm"):
        return None
    return _init_signature(init), return_annotation


def _bare_section_headers(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Rewrites a qualified Google-style header (``Attributes beyond Flax's:``) to the bare
    section napoleon knows (``Attributes:``), before napoleon runs."""
    for index, line in enumerate(lines):
        header = SECTION_HEADER.match(line)
        if header is not None and line.strip() != f"{header.group('section')}:":
            lines[index] = f"{header.group('indent')}{header.group('section')}:"


def _generate(app: Sphinx) -> None:
    generate_api_pages()
    generate_benchmark_tables()
    generate_stability_table()


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", _generate)
    app.connect("autodoc-process-signature", _class_signature)
    app.connect("autodoc-process-docstring", _bare_section_headers, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
