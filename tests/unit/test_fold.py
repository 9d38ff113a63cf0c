"""The fold against an independent reference, property-based."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.events import VariantStatus
from processor.fold import (
    FailurePolicy,
    JobState,
    Pipeline,
    UnfoldableJobError,
    UnknownStepError,
    VariantState,
    fold_job,
)

STEPS = ("ingest", "detect", "segment", "iou_eval")
PIPELINE = Pipeline(STEPS)
JOB = uuid.UUID(int=1)


def reference(latest: list[tuple[str, str | None]], policy: FailurePolicy) -> tuple[str, str] | None:
    """Job state from each live variant's (status, step), written without processor.fold."""
    if not latest:
        return None
    position = {step: i for i, step in enumerate(STEPS)}
    open_ranks = []
    statuses = set()
    failed_open = 0
    for status, step in latest:
        statuses.add(status)
        if status == "done" and step == STEPS[-1]:
            continue
        open_ranks.append(position[step] if step is not None else 0)
        failed_open += status == "failed"
    if not open_ranks:
        return ("done", STEPS[-1])
    step = STEPS[min(open_ranks)]
    if statuses == {"queued"}:
        return ("queued", step)
    if failed_open and (policy is FailurePolicy.IMMEDIATE or failed_open == len(open_ranks)):
        return ("failed", step)
    return ("running", step)


status_st = st.sampled_from([s.value for s in VariantStatus])
step_st = st.one_of(st.none(), st.sampled_from(STEPS))
# A variant's history: its states in version order; the last one may be a delete.
history_st = st.tuples(
    st.lists(st.tuples(status_st, step_st), min_size=1, max_size=6),
    st.booleans(),
)


def current_states(histories: list[tuple[list[tuple[str, str | None]], bool]]) -> list[VariantState]:
    """Each variant's current state (which one is newest is the schema's rule, tested in
    tests/integration/test_newest_state.py): its last change, or a removal."""
    states = []
    for index, (changes, deleted) in enumerate(histories):
        variant = uuid.UUID(int=1000 + index)
        status, step = changes[-1]
        version = len(changes) + deleted
        states.append(
            VariantState(variant, JOB, version, None, None, removed=True)
            if deleted
            else VariantState(variant, JOB, version, VariantStatus(status), step)
        )
    return states


def latest_live(histories: list[tuple[list[tuple[str, str | None]], bool]]) -> list[tuple[str, str | None]]:
    return [changes[-1] for changes, deleted in histories if not deleted]


@settings(max_examples=300, deadline=None)
@given(
    histories=st.lists(history_st, min_size=0, max_size=8),
    policy=st.sampled_from(list(FailurePolicy)),
    data=st.data(),
)
def test_any_order_of_variants_gives_the_reference_state(histories, policy, data):
    shuffled = data.draw(st.permutations(current_states(histories)))

    state = fold_job(shuffled, PIPELINE, policy)

    expected = reference(latest_live(histories), policy)
    assert (None if state is None else (state.status.value, state.current_step)) == expected


def v(index: int, status: str, step: str | None, version: int = 1) -> VariantState:
    return VariantState(uuid.UUID(int=index), JOB, version, VariantStatus(status), step)


def test_done_only_when_every_variant_is_done_at_the_final_step():
    assert fold_job([v(1, "done", "iou_eval"), v(2, "done", "iou_eval")], PIPELINE) == JobState(
        VariantStatus.DONE, "iou_eval"
    )
    assert fold_job([v(1, "done", "iou_eval"), v(2, "done", "segment")], PIPELINE) == JobState(
        VariantStatus.RUNNING, "segment"
    )


def test_running_reports_the_least_advanced_unfinished_step():
    states = [v(1, "done", "iou_eval"), v(2, "running", "segment"), v(3, "done", "detect")]
    assert fold_job(states, PIPELINE) == JobState(VariantStatus.RUNNING, "detect")


def test_queued_when_every_variant_is_queued_and_no_step_means_the_first():
    assert fold_job([v(1, "queued", None), v(2, "queued", None)], PIPELINE) == JobState(VariantStatus.QUEUED, "ingest")


def test_failure_policies():
    mixed = [v(1, "failed", "detect"), v(2, "running", "segment")]
    settled = [v(1, "failed", "detect"), v(2, "done", "iou_eval")]
    assert fold_job(mixed, PIPELINE, FailurePolicy.SETTLED).status is VariantStatus.RUNNING
    assert fold_job(mixed, PIPELINE, FailurePolicy.IMMEDIATE) == JobState(VariantStatus.FAILED, "detect")
    assert fold_job(settled, PIPELINE, FailurePolicy.SETTLED) == JobState(VariantStatus.FAILED, "detect")


def test_a_retried_failure_or_a_rerun_moves_the_job_back_to_running():
    failed = [v(1, "failed", "detect", 3), v(2, "done", "iou_eval", 5)]
    assert fold_job(failed, PIPELINE).status is VariantStatus.FAILED
    retried = [v(1, "running", "detect", 4), v(2, "done", "iou_eval", 5)]
    assert fold_job(retried, PIPELINE) == JobState(VariantStatus.RUNNING, "detect")
    rerun = [v(1, "running", "ingest", 6), v(2, "done", "iou_eval", 5)]
    assert fold_job(rerun, PIPELINE) == JobState(VariantStatus.RUNNING, "ingest")


def test_removed_variants_do_not_count_and_a_job_without_variants_is_left_alone():
    removed = VariantState(uuid.UUID(int=2), JOB, 2, None, None, removed=True)
    assert fold_job([v(1, "done", "iou_eval"), removed], PIPELINE).status is VariantStatus.DONE
    assert fold_job([removed], PIPELINE) is None
    assert fold_job([], PIPELINE) is None


def test_an_unknown_step_is_an_error_not_a_guess():
    with pytest.raises(UnknownStepError, match="'mystery' is not in the pipeline"):
        fold_job([v(1, "running", "mystery"), v(2, "running", "ingest")], PIPELINE)
    with pytest.raises(UnknownStepError):
        fold_job([v(1, "done", "mystery")], PIPELINE)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((), "at least one step"),
        (("a", "b", "a"), "repeated: a"),
        (("a", ""), "non-empty"),
        (("ingest preprocess inference",), "without spaces"),
        (("a", "x" * 201), "at most 200 characters"),
    ],
)
def test_invalid_pipelines_are_refused(steps, message):
    with pytest.raises(ValueError, match=message):
        Pipeline(steps)


def one_per_distinct_state(states: list[VariantState]) -> list[VariantState]:
    """What processor/queries.sql's variant_states_to_fold gives the fold: one live variant per state."""
    chosen: dict[tuple[object, ...], VariantState] = {}
    for state in states:
        if not state.removed:
            chosen.setdefault((state.status, state.step, state.problem), state)
    return list(chosen.values())


def fold_outcome(states: list[VariantState], policy: FailurePolicy) -> object:
    try:
        return fold_job(states, PIPELINE, policy)
    except UnfoldableJobError as exc:
        return type(exc)


state_st = st.tuples(
    status_st,
    st.one_of(step_st, st.just("not_a_step")),
    st.one_of(st.none(), st.just("event 7 is a dead letter: bad")),
)


@settings(max_examples=300, deadline=None)
@given(latest=st.lists(st.tuples(state_st, st.booleans()), max_size=12), policy=st.sampled_from(list(FailurePolicy)))
def test_the_fold_depends_only_on_which_states_occur(latest, policy):
    # The processor folds from one example variant per distinct state (variant_states_to_fold):
    # the result must be the one from every variant.
    states = [
        VariantState(uuid.UUID(int=100 + i), JOB, 1, VariantStatus(status), step, removed=removed, problem=problem)
        for i, ((status, step, problem), removed) in enumerate(latest)
    ]
    assert fold_outcome(one_per_distinct_state(states), policy) == fold_outcome(states, policy)
