"""A logger for the callback-equals-function tests: it keeps every ``log_metrics`` call."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger

#: Keys the base class adds to a measurement's scalars (the budget's bookkeeping), not the method's.
BASE_KEYS = {"overhead", "skipped", "work"}


class Recorder(Logger):
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass
