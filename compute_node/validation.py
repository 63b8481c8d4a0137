"""Checks of a Generate request's fields before anything is tokenized or queued: every
bad field is an INVALID_ARGUMENT that names it."""

from __future__ import annotations

from strata.errors import invalid


def check_generate(request) -> None:
    """Raises StrataError(INVALID_ARGUMENT) naming the first bad field of `request`."""
    if not request.prompts:
        raise invalid("no prompts given")
