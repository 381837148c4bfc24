"""``python -m gia_bench`` runs the ``gia-bench`` command line."""

from gia_bench.cli import app

app(prog_name="gia-bench")
