# Sphinx configuration for the txtunnel documentation.
#
# The pages are hand-written reStructuredText; no autodoc, so the docs build
# (``tox -e docs``) needs only Sphinx, not txtunnel's own dependencies.

project = "txtunnel"
author = "the txtunnel authors"
copyright = "the txtunnel authors"

try:
    import os
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "src", "txtunnel", "__init__.py"), encoding="utf-8") as f:
        release = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)  # type: ignore[union-attr]
except (OSError, AttributeError):
    release = "unknown"
version = release

extensions: list[str] = []

root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []
highlight_language = "none"

html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {
    "description": "A self-hostable reverse tunnel on Twisted",
    "fixed_sidebar": True,
}
