"""Failures a command reports as one line: it ran, stopped for a reason it names, and a rerun resumes.

`vggdist` prints such a failure as ``vggdist <command>: error: <message>`` and exits 1; ``--verbose`` adds the
traceback. Usage errors (exit 2) are ``ValueError``s raised before anything runs; anything else is an internal
error whose traceback is printed. Kept free of heavy imports so that the command line can catch it.
"""

from __future__ import annotations


class CommandFailed(Exception):
    """The command ran and could not finish; the message says why, what to fix and how to resume (exit 1)."""
