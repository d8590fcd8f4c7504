"""The documentation site: its examples run, its guides' code runs, its math renders offline.

* every public name (``docs/_ext/public_api.py``) has a runnable example with math on its
  API page: ``>>>`` lines in its docstring or in ``docs/api_examples/<name>.rst``, and math
  (``:math:`` / ``.. math::``) in either; the examples run here as doctests;
* every ```python block of the guides (``docs/**/*.md``) runs, as the README's do; a block
  whose first line is ``# not run: <reason>`` is shown but skipped;
* the built site (``python -m sphinx -W -b html docs docs/_build/html``, which ``.ci/run``
  runs before the tests) loads no script, style sheet or font from the network, and in
  headless Chromium the API page of ``jaxnorm.batch_norm`` shows typeset math (MathJax
  elements, no raw TeX left). These skip, with the reason, where the site is not built or
  Chromium is absent (``apt-get install chromium``).
"""

from __future__ import annotations

import doctest
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SITE = DOCS / "_build" / "html"
EXAMPLES = DOCS / "api_examples"
BUILD_COMMAND = "pip install -e '.[docs]' && python -m sphinx -W -b html docs docs/_build/html"
sys.path.insert(0, str(DOCS / "_ext"))

from public_api import all_public_names

PUBLIC_NAMES = all_public_names()
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MATH = re.compile(r":math:`|\.\. math::")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
NOT_RUN = "# not run:"


def example_text(name: str) -> str:
    path = EXAMPLES / f"{name}.rst"
    return path.read_text() if path.exists() else ""


def docstring(value: object) -> str:
    return getattr(value, "__doc__", None) or ""


@pytest.mark.parametrize(("name", "value"), PUBLIC_NAMES, ids=[n for n, _ in PUBLIC_NAMES])
def test_public_name_has_example_and_math_on_its_page(name: str, value: object) -> None:
    page_text = docstring(value) + example_text(name)
    assert ">>>" in page_text, (
        f"{name} has no runnable example: add an Examples: section with >>> lines to its "
        f"docstring, or write docs/api_examples/{name}.rst"
    )
    assert MATH.search(page_text), f"{name}: state its math (:math: or .. math::)"


def test_every_example_file_belongs_to_a_public_name() -> None:
    names = {name for name, _ in PUBLIC_NAMES}
    orphans = sorted(p.stem for p in EXAMPLES.glob("*.rst") if p.stem not in names)
    assert not orphans, f"examples of names that are not public (renamed?): {orphans}"


NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


class WrittenPrecisionChecker(doctest.OutputChecker):
    """Also accepts output whose numbers match the expected ones to the precision written
    there (pytest's ``NUMBER`` option): ``0.1`` matches the float32 ``0.10000000149011612``,
    ``0.8485`` matches ``0.8484999537467957``; the text around the numbers must agree."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if super().check_output(want, got, optionflags):
            return True
        wanted, gotten = NUMBER.findall(want), NUMBER.findall(got)
        if len(wanted) != len(gotten):
            return False
        if " ".join(NUMBER.sub("#", want).split()) != " ".join(NUMBER.sub("#", got).split()):
            return False
        return all(_agrees(w, g) for w, g in zip(wanted, gotten, strict=True))


def _agrees(written: str, value: str) -> bool:
    mantissa = written.lower().split("e")[0]
    if "." not in mantissa:
        return float(written) == float(value)
    decimals = len(mantissa.split(".")[1])
    scale = 10.0 ** int(written.lower().split("e")[1]) if "e" in written.lower() else 1.0
    return abs(float(value) - float(written)) <= 0.5 * 10.0**-decimals * scale * (1 + 1e-9)


def run_doctests(text: str, name: str) -> None:
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(checker=WrittenPrecisionChecker(), optionflags=DOCTEST_FLAGS)
    test = parser.get_doctest(text, {"__name__": f"doc_{name}"}, name, name, 0)
    assert test.examples, f"{name}: no >>> examples"
    output: list[str] = []
    result = runner.run(test, out=output.append)
    assert result.failed == 0, "".join(output)


def test_doctest_numbers_match_to_the_written_precision() -> None:
    check = WrittenPrecisionChecker().check_output
    assert check("[[0.8485, 1.1314]]\n", "[[0.8484999537467957, 1.1313999891281128]]\n", 0)
    assert check("0.1\n", "0.10000000149011612\n", 0)
    assert check("1.5e-3\n", "0.00150004\n", 0)
    assert not check("0.1\n", "0.2\n", 0)  # off in the written digit
    assert not check("0.8485\n", "0.8487\n", 0)
    assert not check("[0.1, 2]\n", "[0.1, 3]\n", 0)  # integers exactly
    assert not check("(0.1, 'a')\n", "(0.1, 'b')\n", 0)  # the text around must agree


@pytest.mark.parametrize(("name", "value"), PUBLIC_NAMES, ids=[n for n, _ in PUBLIC_NAMES])
def test_examples_run(name: str, value: object) -> None:
    text = example_text(name) + "\n" + docstring(value)
    if ">>>" not in text:
        pytest.skip(f"{name} has no example (test_public_name_has_example_... fails)")
    run_doctests(text, name)


def guide_blocks() -> list[tuple[str, str]]:
    """``(file:line, code)`` of every ```python block of the Markdown pages under docs/."""
    blocks = []
    for path in sorted(DOCS.rglob("*.md")):
        if "_build" in path.parts or "_generated" in path.parts:
            continue
        text = path.read_text()
        for match in PYTHON_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{path.relative_to(DOCS)}:{line}", match.group(1)))
    return blocks


GUIDE_BLOCKS = guide_blocks()


def test_guides_have_code() -> None:
    assert len(GUIDE_BLOCKS) >= 10
    assert sum(code.startswith(NOT_RUN) for _, code in GUIDE_BLOCKS) <= 1


@pytest.mark.parametrize(("where", "code"), GUIDE_BLOCKS, ids=[w for w, _ in GUIDE_BLOCKS])
def test_guide_python_block_runs(where: str, code: str) -> None:
    if code.startswith(NOT_RUN):
        pytest.skip(code.splitlines()[0].removeprefix("# "))
    # a registered module, as a script would be: dataclasses (Flax modules) look it up
    module = types.ModuleType("docs_" + re.sub(r"\W", "_", where))
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, where, "exec"), module.__dict__)  # noqa: S102
    finally:
        del sys.modules[module.__name__]


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REMOTE_SCRIPT = re.compile(r"<script[^>]*\ssrc=[\"'](?:https?:)?//", re.IGNORECASE)
REMOTE_STYLE = re.compile(
    r"<link[^>]*\shref=[\"'](?:https?:)?//[^>]*>|@import\s+url\(\s*[\"']?(?:https?:)?//|"
    r"url\(\s*[\"']?(?:https?:)?//",
    re.IGNORECASE,
)
SCRIPT_ELEMENT = re.compile(r"<script\b.*?</script>", re.DOTALL | re.IGNORECASE)
BATCH_NORM_PAGE = SITE / "api" / "jaxnorm.batch_norm.html"
SCREENSHOT = DOCS / "_build" / "screenshots" / "jaxnorm.batch_norm.png"


def built_site() -> Path:
    if not BATCH_NORM_PAGE.exists():
        pytest.skip(f"the documentation site is not built: {BUILD_COMMAND}")
    return SITE


def test_built_site_loads_nothing_from_the_network() -> None:
    site = built_site()
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > len(PUBLIC_NAMES)
    for page in pages:
        text = page.read_text()
        assert not REMOTE_SCRIPT.search(text), f"{page}: a script from the network"
        assert not REMOTE_STYLE.search(text), f"{page}: a style sheet from the network"
    for style in (site / "_static").rglob("*.css"):
        assert not REMOTE_STYLE.search(style.read_text()), f"{style}: imports from the network"
    assert "_static/mathjax/tex-chtml.js" in BATCH_NORM_PAGE.read_text()
    assert (site / "_static" / "mathjax" / "tex-chtml.js").stat().st_size > 500_000


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip("headless Chromium is absent: apt-get install chromium (as .ci/run does)")


def run_chromium(*arguments: str) -> str:
    """Headless Chromium with every network request failing, so only local files load."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000",
            *arguments,
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=180, check=False
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_batch_norm_page_math_renders_offline_in_chromium() -> None:
    built_site()
    static_html = BATCH_NORM_PAGE.read_text()
    formulas = static_html.count('class="math notranslate')
    assert formulas >= 2 and "\\frac" in static_html  # the page has math to typeset

    dom = run_chromium("--dump-dom", BATCH_NORM_PAGE.as_uri())
    visible = SCRIPT_ELEMENT.sub("", dom)
    typeset = visible.count("<mjx-container")
    assert typeset >= formulas, f"{typeset} typeset formulas of {formulas}"
    assert "\\frac" not in visible and "\\(" not in visible and "\\[" not in visible
    assert "<mjx-c " in visible or "<mjx-c>" in visible  # glyphs from the bundled font

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    run_chromium(f"--screenshot={SCREENSHOT}", "--window-size=1200,2000",
                 BATCH_NORM_PAGE.as_uri())
    assert SCREENSHOT.stat().st_size > 10_000
