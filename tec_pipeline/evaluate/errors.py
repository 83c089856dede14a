"""The evaluation's one error type, shared by its modules."""
from __future__ import annotations

from ..errors import UserError


class EvalError(UserError):
    """An evaluation that cannot run as asked (unlabelled folder, unknown pooling, ...)."""
