"""The iSCSI target. ``build.select()`` runs before any of its modules is imported: it decides whether
the compiled hot modules run or their pure-Python sources do (frontend/build.py)."""

from frontend import build as _build

_build.select()
