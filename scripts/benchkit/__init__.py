"""The pieces of ``scripts/bench.py``: shared helpers (``common``, ``runs``, ``loops``) and the
row functions, grouped by theme (``speed``, ``overheads``, ``processes``, ``gpu``)."""
