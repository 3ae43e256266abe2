"""The dashboard's pages, one module each; ``app.py`` draws the one the sidebar names.

Each page reads through :func:`audit.dashboard.runtime.load` and writes through :mod:`audit.queries` (or
:mod:`audit.duplicates_view`), so a page is layout and widgets only.
"""
