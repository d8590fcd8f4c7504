"""Sphinx configuration of jaxnorm's documentation.

Build (warnings are errors):  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import jaxnorm

project = "jaxnorm"
author = "jaxnorm authors"
copyright = "jaxnorm authors, Apache-2.0"
release = version = jaxnorm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "offline_mathjax",  # MathJax from a package, copied into the site: no CDN
    "jaxnorm_api",  # the API pages from __all__, the benchmark tables from benchmarks/
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# api_examples/ are included into the API pages; _generated/ into the guides
exclude_patterns = ["_build", "api_examples", "_generated"]

# autodoc: the API reference
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True  # show `zeros`, not `<function zeros at 0x...>`
autodoc_typehints = "signature"
autosummary_generate = False  # pages come from jaxnorm_api
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False  # `Attributes:` as attribute entries (Flax documents fields so)
napoleon_use_rtype = False

# MyST: the guides are Markdown with $math$ and ```python blocks
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"jaxnorm {release}"
html_static_path = ["_static"]
html_show_sourcelink = False
