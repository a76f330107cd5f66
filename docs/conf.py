"""Sphinx configuration of the unisparse-ref documentation.

Build (from the repository root; must pass with no warnings, cross-references included):

    sphinx-build -n -W --keep-going -b html docs docs/_build/html

The tutorials live in the top-level ``tutorials/`` folder, where users open them. This file
copies them into ``docs/tutorials/`` (git-ignored) before Sphinx reads its sources, and
myst-nb executes every one of them on each build, so a notebook that fails fails the build.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the checkout even if it is not installed

# -- tutorials: copy tutorials/*.ipynb into docs/tutorials/ ---------------------------------
_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = DOCS / "tutorials"


def _copy_tutorials() -> None:
    """Mirror ``tutorials/*.ipynb`` into ``docs/tutorials/`` (stale copies removed)."""
    _TUTORIALS_DST.mkdir(exist_ok=True)
    wanted = {p.name for p in _TUTORIALS_SRC.glob("*.ipynb")}
    for old in _TUTORIALS_DST.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for src in sorted(_TUTORIALS_SRC.glob("*.ipynb")):
        dst = _TUTORIALS_DST / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)  # copy only when changed, so Sphinx sees no spurious edits


_copy_tutorials()

# The notebook kernels inherit this environment. Figures must come back as inline images
# (rendered with Agg) even where the environment sets MPLBACKEND=Agg, under which plt.show()
# would draw nothing into the page.
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

# -- project -----------------------------------------------------------------------------
import unisparse_ref  # noqa: E402

project = "unisparse-ref"
author = "unisparse-ref developers"
copyright = "2026, unisparse-ref developers"
release = unisparse_ref.__version__
version = release

# -- general -------------------------------------------------------------------------------
extensions = [
    "myst_nb",  # Markdown pages (MyST) and executed notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "_static", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path: list[str] = []

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- notebooks (myst-nb) -----------------------------------------------------------------
nb_execution_mode = "force"  # execute every notebook on every build: the docs build is their test
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_timeout = 600  # seconds per cell; the tutorials take seconds, this only guards hangs
nb_execution_show_tb = True  # print the traceback of a failing cell in the build log
nb_merge_streams = True

# -- autodoc / napoleon (NumPy-style docstrings) ------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"unisparse-ref {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# -- warnings ------------------------------------------------------------------------------
# Nitpicky: every cross-reference must resolve (``-n``). Two kinds of target cannot, and are
# named here instead: other projects' types (the docs build offline, without intersphinx),
# and the informal words of NumPy-style type lines ("array, shape [B, H, N, D]", "optional").
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(numpy|np|cupy|collections\.abc|typing|numba|torch|pathlib)(\..*)?"),
    ("py:class", r"Path"),  # pathlib's, in signatures
    ("py:class", r"(optional|array|array-like|arrays|sequence|callable|dtype|backend object|int|float|bool|str|"
                 r"None|tuple|list|dict|type|object|default|of|any|shape)( .*)?"),
    ("py:class", r"(list|tuple|dict)\[.*"),
]
# Nothing else is suppressed. Pages written by other layers may be absent (performance.md,
# layers/*, gpu_results/*); instead of silencing the toctree warnings for every page, the
# hook below drops exactly the toctree entries of the index that match no document.
suppress_warnings: list[str] = []


# -- optional pages ------------------------------------------------------------------------
_OPTIONAL_TOCTREE_DOCS = ("index", "tutorials")


def _entry_docs(entry: str, found: set[str], listed: set[str]) -> set[str]:
    """The documents a toctree ``entry`` of a top-level page names (a glob or one name)."""
    name = entry.split("<")[-1].rstrip(">").strip()  # "Title <doc>" -> "doc"
    for suffix in (".md", ".ipynb", ".rst"):
        name = name.removesuffix(suffix)
    if any(ch in name for ch in "*?["):
        return {d for d in found if fnmatch.fnmatchcase(d, name)} - listed
    return {name} & found


def _drop_missing_toctree_entries(app, docname: str, source: list[str]) -> None:
    """``source-read``: drop toctree entries of the index pages that match no document.

    Other layers' pages (``layers/*``, ``performance``, ``gpu_results/*``) and the
    tutorials may not exist in every checkout; Sphinx warns for a glob that matches nothing
    (a warning it offers no way to suppress) and for a missing explicit entry.
    """
    if docname not in _OPTIONAL_TOCTREE_DOCS:
        return
    found = set(app.env.found_docs)
    out: list[str] = []
    in_toctree = False
    listed: set[str] = set()
    for line in source[0].splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("```{toctree}"):
            in_toctree, listed = True, set()
        elif in_toctree and stripped.startswith("```"):
            in_toctree = False
        elif in_toctree and stripped and not stripped.startswith(":"):
            docs = _entry_docs(stripped, found, listed)
            if not docs:
                continue  # names nothing: leave it out
            listed |= docs
        out.append(line)
    source[0] = "".join(out)


def _always_reread_indexes(app, env, added, changed, removed) -> list[str]:
    """``env-get-outdated``: re-read the index pages, whose toctrees depend on other files."""
    return [d for d in (*_OPTIONAL_TOCTREE_DOCS, "api") if d in env.found_docs]


# -- API pages of optional modules ---------------------------------------------------------
#: Modules beyond the core that api.md documents when they import here and no other page
#: (a layer page) documents them with ``automodule``.
_API_OPTIONAL_MODULES = (
    "unisparse_ref.masks",
    "unisparse_ref.testing",
    "unisparse_ref.numba_backend",
    "unisparse_ref.cupy_backend",
)
_AUTOMODULE_RE = re.compile(r"(?:\.\.\s+automodule::|\{automodule\})\s+(\S+)")


def _documented_elsewhere() -> set[str]:
    """Modules that pages other than api.md document with ``automodule``."""
    names: set[str] = set()
    for page in DOCS.rglob("*"):
        if page.suffix not in (".md", ".rst") or page.name == "api.md" or "_build" in page.parts:
            continue
        names.update(_AUTOMODULE_RE.findall(page.read_text(encoding="utf-8")))
    return names


def _importable(module: str) -> bool:
    """Whether ``module`` imports here (a GPU layer may not: no CuPy, no CUDA)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure means "not documented on this machine"
        return False
    return True


def _append_optional_api(app, docname: str, source: list[str]) -> None:
    """``source-read``: add an API section to api.md for each optional module that imports."""
    if docname != "api":
        return
    elsewhere = _documented_elsewhere()
    extra = [m for m in _API_OPTIONAL_MODULES if m not in elsewhere and _importable(m)]
    for module in extra:
        source[0] += f"\n## `{module}`\n\n```{{eval-rst}}\n.. automodule:: {module}\n```\n"


# -- re-exported names -------------------------------------------------------------------
def _lookup(dotted: str):
    """The object a dotted name denotes (module prefix imported, then attributes), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001 - not a module: try a shorter prefix
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_reexports(app, env, node, contnode):
    """``missing-reference``: ``unisparse_ref.BlockMask`` (a re-export, as users write it) or a
    bare ``BlockMask`` resolves to where the name is documented (``unisparse_ref.blockmask.BlockMask``)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    cands = [target] if target.startswith("unisparse_ref") else [f"unisparse_ref.{target}"]
    if node.get("py:module") and not target.startswith("unisparse_ref"):
        cands.append(f"{node['py:module']}.{target}")
    domain = env.get_domain("py")
    for cand in cands:
        if cand != target:  # documented under the re-exported name itself (module data)
            res = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], cand, node, contnode)
            if res is not None:
                return res
        obj = _lookup(cand)
        mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if isinstance(obj, type(sys)):
            mod, qual = obj.__name__, None
        if mod is None or not mod.startswith("unisparse_ref"):
            continue
        canonical = f"{mod}.{qual}" if qual else mod
        if canonical == target:
            continue
        for reftype in (node["reftype"], "obj"):
            res = domain.resolve_xref(env, node["refdoc"], app.builder, reftype, canonical, node, contnode)
            if res is not None:
                return res
    return None


def setup(app) -> dict:
    app.connect("missing-reference", _resolve_reexports)
    app.connect("source-read", _append_optional_api)
    app.connect("source-read", _drop_missing_toctree_entries)
    app.connect("env-get-outdated", _always_reread_indexes)
    return {"parallel_read_safe": True}
