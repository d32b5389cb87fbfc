"""The search's and the refinement's results: one typed record per trial or configuration.

A record is a frozen dataclass that also reads like the dict rows of earlier versions
(``row["value"]``, ``dict(row)``), so code written against those keeps working.

Example:
    >>> row = TrialRecord(number=3, lr=1e-3, weight_decay=0.0, value=0.91, state="complete",
    ...                   epochs=2, steps=46, seconds=0.4)
    >>> row.value == row["value"], sorted(dict(row))[:3]
    (True, ['curve', 'ended_at', 'ended_by'])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_diag.tensorboard.writer import markdown_table

__all__ = ["RefineResult", "RefinedConfig", "SearchResult", "TrialRecord"]


class _Readable(Mapping[str, Any]):
    """Read access by field name, as for the dict rows these records replace."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class TrialRecord(_Readable):
    """One finished (complete or pruned) trial of a search.

    Attributes:
        number: The trial's number in the study. lr, weight_decay: Its configuration.
        value: Its last reported ``monitor`` (NaN when it was never validated).
        state: ``"complete"`` or ``"pruned"``.
        epochs: Validations it reported. steps: Optimizer steps it trained.
        seconds: Wall time from its start to its end, from the study's timestamps.
        worker: The process id that ran it.
        ended_by: The code of the finding that ended a trial the diagnosis pruned,
            ``"pruner"`` for one Optuna's pruner stopped, else ``""``.
        ended_at: The step of that finding. why: Its sentence.
        curve: The reported values, one per validation.
    """

    number: int
    lr: float
    weight_decay: float
    value: float
    state: str
    epochs: int
    steps: int
    seconds: float
    worker: int | None = None
    ended_by: str = ""
    ended_at: int | None = None
    why: str = ""
    curve: list[float] = field(default_factory=list)

    def ended(self) -> str:
        """The "ended by" cell: the finding's code and step, the median pruner, or nothing.

        Example:
            >>> TrialRecord(0, 1.0, 0.0, math.nan, "pruned", 0, 1, 0.1,
            ...             ended_by="update_ratio.too_high", ended_at=0).ended()
            'update_ratio.too_high (step 0)'
        """
        if self.ended_by == "pruner":
            return f"Optuna's pruner (epoch {self.epochs})"
        if self.ended_by:
            return f"{self.ended_by} (step {self.ended_at})"
        return ""


@dataclass(frozen=True, eq=False)
class RefinedConfig(_Readable):
    """One configuration of the search trained longer by :func:`refine`.

    Attributes:
        rank: 1 for the best. lr, weight_decay: The configuration. value: Its final ``monitor``.
        advisor: The codes of the advisor's verdicts (WARN and above).
        trial: The search trial it came from. reading: The verdicts, formatted.
        curve: ``monitor`` after each epoch.
    """

    rank: int
    lr: float
    weight_decay: float
    value: float
    advisor: list[str] = field(default_factory=list)
    trial: int | None = None
    reading: list[str] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)


@dataclass
class SearchResult:
    """A finished (or resumed) search: every trial, best first, and what is needed to refine.

    Attributes:
        rows: One :class:`TrialRecord` per finished trial, completed ones first, best first.
        study_name, storage: Where the study lives.
        monitor, direction: The objective.
    """

    rows: list[TrialRecord]
    study_name: str
    storage: str
    monitor: str
    direction: str
    model_factory: Any = field(repr=False)
    data: Any = field(repr=False)
    run_dir: Path = field(repr=False)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        """Every trial, best first, then one line per trial the diagnosis ended saying why."""
        table = markdown_table(
            ["trial", "lr", "weight decay", self.monitor, "state", "epochs", "steps", "ended by"],
            [[str(r.number), f"{r.lr:.3e}", f"{r.weight_decay:g}",
              f"{r.value:.4f}" if math.isfinite(r.value) else "-", r.state, str(r.epochs),
              str(r.steps), r.ended()] for r in self.rows])
        why = [f"- trial {r.number}: {r.why}" for r in sorted(self.rows, key=lambda r: r.number)
               if r.why]
        if not why:
            return table
        return "\n\n".join([table, "Trials the diagnosis ended:", "\n".join(why)])


#: What the best refined run's verdict says to do, the most pressing first.
_NEXT = (
    ("advisor.divergence", "diverged: lower its learning rate (about 10x) before training it "
                           "longer"),
    ("advisor.overfit", "overfits: raise its weight decay or add other regularization (or get "
                        "more data), then refine it again"),
    ("advisor.underfit", "underfits: use a bigger model or train it longer"),
    ("advisor.plateau", "plateaus while its loss is still high: decay its learning rate (x0.1) "
                        "and train on"),
)


@dataclass
class RefineResult:
    """The best configurations trained longer, ranked, with the advisor's reading of each run.

    ``rows`` may be given as mappings with the fields of :class:`RefinedConfig`; they are
    turned into records.
    """

    rows: list[RefinedConfig]
    monitor: str

    def __post_init__(self) -> None:
        self.rows = [r if isinstance(r, RefinedConfig) else RefinedConfig(**r) for r in self.rows]

    def table(self) -> str:
        """The ranked configurations, then :meth:`next_step`."""
        return markdown_table(
            ["rank", "lr", "weight decay", self.monitor, "advisor"],
            [[str(r.rank), f"{r.lr:.3e}", f"{r.weight_decay:g}", f"{r.value:.4f}",
              ", ".join(r.advisor) or "healthy"] for r in self.rows]
        ) + f"\n\n{self.next_step()}"

    def next_step(self) -> str:
        """One sentence: the configuration to train longer, or what to change in it (recipe
        6.4, read from the advisor's verdicts on the best run; step 5: back to step 3).

        Example:
            >>> RefineResult([{"rank": 1, "lr": 3e-3, "weight_decay": 1e-4, "value": 0.97,
            ...                "advisor": ["advisor.overfit"]}], "val_acc").next_step()[:81]
            'Next: configuration 1 (lr 3.00e-03, weight decay 0.0001, val_acc 0.9700) overfits'
        """
        if not self.rows:
            return "Next: nothing was refined."
        best = self.rows[0]
        name = (f"configuration {best.rank} (lr {best.lr:.2e}, weight decay "
                f"{best.weight_decay:g}, {self.monitor} {best.value:.4f})")
        said = set(best.advisor)
        what = next((text for code, text in _NEXT if code in said), None)
        if what is not None:
            return f"Next: {name} {what}."
        others = ", ".join(sorted(said))
        if others:
            return f"Next: look at {name}'s findings ({others}) before training it longer."
        return (f"Next: train {name} longer: the advisor saw no plateau, under- or overfitting "
                "in its run (recipe step 6.5: back to step 3 with more epochs).")

