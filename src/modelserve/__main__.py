"""``python -m modelserve`` = the ``modelserve`` command."""

from modelserve.cli import app

app(prog_name="modelserve")
