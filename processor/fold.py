"""The fold: from the latest state of each of a job's variants to the job's state.

Pure functions, no I/O. The processor calls ``fold_job`` for every job a batch touches; tests call
it directly (tests/unit/test_fold.py).

Rules (docs/design.md: "Job state"):

- ``done`` at the final step when every variant is ``done`` at the final step;
- ``queued`` when every variant is ``queued``;
- ``failed`` per the failure policy: ``settled`` (default) once every variant is terminal (done at
  the final step, or failed) and at least one failed; ``immediate`` as soon as any variant failed;
- otherwise ``running``.

``current_step`` is the final step for a done job, else the least advanced step among the variants
that are not done at the final step. A variant with no step yet counts as waiting for the first
step. A job that cannot be folded raises ``UnfoldableJobError`` (a step missing from the
pipeline, or a variant whose last event was unusable): the processor flags the job and leaves its
state as it was rather than guess.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from outbox.events import STEP_MAX_CHARS, VariantStatus
from processor.errors import InvalidPipelineError, UnfoldableJobError, UnknownStepError


class FailurePolicy(StrEnum):
    """When a job with a failed variant becomes ``failed``."""

    SETTLED = "settled"
    IMMEDIATE = "immediate"


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The ordered pipeline steps; the last one is final."""

    steps: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise InvalidPipelineError("the pipeline needs at least one step")
        if any(not step or any(c.isspace() for c in step) for step in self.steps):
            raise InvalidPipelineError(
                f"pipeline steps must be non-empty names without spaces, separated by commas: {','.join(self.steps)!r}"
            )
        too_long = [step for step in self.steps if len(step) > STEP_MAX_CHARS]
        if too_long:
            raise InvalidPipelineError(
                f"a pipeline step may be at most {STEP_MAX_CHARS} characters, as an event carries it "
                f"(got one of {len(too_long[0])})"
            )
        duplicates = sorted({step for step in self.steps if self.steps.count(step) > 1})
        if duplicates:
            raise InvalidPipelineError(f"pipeline steps must be unique; repeated: {', '.join(duplicates)}")

    @property
    def final(self) -> str:
        return self.steps[-1]

    def rank(self, step: str | None) -> int:
        """Position of ``step`` in the pipeline; no step yet ranks as the first step."""
        if step is None:
            return 0
        try:
            return self.steps.index(step)
        except ValueError:
            raise UnknownStepError(f"step {step!r} is not in the pipeline ({', '.join(self.steps)})") from None

    def __contains__(self, step: object) -> bool:
        return step in self.steps


@dataclass(frozen=True, slots=True)
class VariantState:
    """One variant's state as of one of its versions.

    ``removed`` marks a deleted variant; ``problem`` says why this version could not be read.
    """

    variant_id: uuid.UUID
    job_id: uuid.UUID
    version: int
    status: VariantStatus | None
    step: str | None
    removed: bool = False
    problem: str | None = None


def newest_states(candidates: Iterable[tuple[VariantState, int]]) -> dict[uuid.UUID, tuple[VariantState, int]]:
    """Each variant's newest state among (state, event id) candidates: the highest version, then event id.

    The rule's one home in Python; in SQL it is outbox_variant_states_newest (and outbox_state_newer,
    which guards the stored state), which every merge goes through. Two events of one version exist
    only when written by hand: the later event id wins. tests/integration/test_newest_state.py
    checks that the two homes agree.
    """
    newest: dict[uuid.UUID, tuple[VariantState, int]] = {}
    for state, event_id in candidates:
        best = newest.get(state.variant_id)
        if best is None or (state.version, event_id) > (best[0].version, best[1]):
            newest[state.variant_id] = (state, event_id)
    return newest


@dataclass(frozen=True, slots=True)
class JobState:
    status: VariantStatus
    current_step: str | None


def finished(state: VariantState, pipeline: Pipeline) -> bool:
    """Whether a variant is done for good: ``done`` at the final step."""
    return state.status is VariantStatus.DONE and state.step == pipeline.final


def fold_job(
    states: Iterable[VariantState],
    pipeline: Pipeline,
    policy: FailurePolicy = FailurePolicy.SETTLED,
) -> JobState | None:
    """Compute a job's state from the current state of each of its variants; None when none is left.

    ``states`` holds one state per variant: which one is newest is decided before (newest_states,
    outbox_variant_states_newest where states are stored), never here. Removed variants do not count.
    """
    live = [s for s in states if not s.removed]
    if not live:
        return None
    for state in live:
        if state.problem is not None:
            where = (
                f"variant {state.variant_id}: " if state.variant_id.int else ""
            )  # nil: a dead letter holding the job
            raise UnfoldableJobError(f"{where}{state.problem}")

    unfinished = [s for s in live if not finished(s, pipeline)]
    # Rank every step, the finished variants' too, so an unknown step is never passed over.
    ranks = {s.variant_id: pipeline.rank(s.step) for s in live}
    if not unfinished:
        return JobState(VariantStatus.DONE, pipeline.final)

    least_advanced = min(unfinished, key=lambda s: ranks[s.variant_id])
    current_step = pipeline.steps[ranks[least_advanced.variant_id]]

    if all(s.status is VariantStatus.QUEUED for s in live):
        return JobState(VariantStatus.QUEUED, current_step)

    failed = [s for s in unfinished if s.status is VariantStatus.FAILED]
    if failed and (policy is FailurePolicy.IMMEDIATE or len(failed) == len(unfinished)):
        return JobState(VariantStatus.FAILED, current_step)

    return JobState(VariantStatus.RUNNING, current_step)
