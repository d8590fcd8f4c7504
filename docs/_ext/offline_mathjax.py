"""Sphinx extension: MathJax 3 served from the built site, never from a CDN.

The MathJax files come from the ``sphinx-mathjax-offline`` package (MathJax 3.2.2, a copy
of the upstream ``es5`` build). This extension sets ``mathjax_path`` to the local copy and
copies the files the CommonHTML output needs into ``_static/mathjax`` of the built site:
the combined ``tex-chtml.js``, the TeX extensions it may autoload, its fonts, and the
menu and accessibility components (with the speech rule engine) it loads on demand.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.fileutil import copy_asset

MATHJAX_SCRIPT = "mathjax/tex-chtml.js"
COPIED = (
    "tex-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y", "adaptors", "sre",
)


def mathjax_source() -> Path:
    """The directory of MathJax's ``es5`` build inside ``sphinx-mathjax-offline``."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise ExtensionError(
            "offline math needs the sphinx-mathjax-offline package: pip install -e '.[docs]'"
        )
    return Path(spec.origin).parent / "static" / "mathjax"


def _use_local_mathjax(app: Sphinx, config: Any) -> None:
    config.mathjax_path = MATHJAX_SCRIPT


def _copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source = mathjax_source()
    target = Path(app.outdir) / "_static" / "mathjax"
    for relative in COPIED:
        path = source / relative
        if path.is_dir():
            copy_asset(path, target / relative)
        else:
            target.joinpath(relative).parent.mkdir(parents=True, exist_ok=True)
            copy_asset(path, target / Path(relative).parent)


def setup(app: Sphinx) -> dict[str, Any]:
    mathjax_source()  # fail early, with the install command, when the package is missing
    app.connect("config-inited", _use_local_mathjax)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
