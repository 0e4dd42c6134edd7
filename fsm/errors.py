"""The one exception type of `fsm`."""

from __future__ import annotations


class ConstraintError(ValueError):
    """A regex or JSON schema that is invalid, or that cannot be enforced exactly.

    The message names the problem (the keyword, construct or position) so that the request
    that carried the constraint can fail with it while the engine keeps serving others.
    """
