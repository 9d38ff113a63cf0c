"""`outbox explain JOB_ID`: why one job is in the state it is in, in one place.

``explain`` reads, in one snapshot, the job's row and what the processor keeps about it (hold,
flag, its place in outbox_dirty_jobs, its partition's checkpoint and worker), each variant's row
and stored state, the variant's newest events with what the checkpoint says of each, the open
transactions that hold a variant's change (and its event) invisible, the job's dead letters and
transitions; then folds the stored states with the product's fold (processor.fold) and says what
it decided, and whether the job row is that decision. Every read is by a key or an index
(processor/store/inspection.sql, "outbox explain"), so it is as fast on a large outbox as on a small one.

The rules come from their owners, never restated here: which events are applied
(``outbox_event_applied_v1``) and pending (``outbox_events_pending``) is decided in SQL by the
product's functions, a variant's newest state by ``outbox_variant_states_newest`` (what is stored),
the job's state by ``processor.fold.fold_job`` on the same input the worker folds
(``store.variant_states_to_fold``).

processor.render prints the report for a person (``explain_text``) and gives the ``--json`` document
(``to_json``), whose shape (keys and types) is stable (tests/integration/test_explain.py checks it):

- ``job_id`` (str), ``partition`` (int), ``job``: {``status``, ``current_step``, ``updated_at``};
- ``hold``: null or {``status``, ``current_step``, ``reason``, ``held_at``};
  ``flag``: null or {``reason``, ``flagged_at``};
  ``awaiting_fold``: null or {``since``, ``retry_at``} (queued in outbox_dirty_jobs);
  ``row_lock``: null or {``pid``, ``application_name``, ``state``, ``since``} (the job row's locker);
- ``checkpoint``: {``partition``, ``done_snapshot``, ``catching_up_to``, ``updated_at``, ``worker``:
  null or {``pid``, ``application_name``, ``since``}};
- ``fold``: {``status``, ``current_step`` (null when it cannot fold, or no variant is left),
  ``unfoldable`` (null or why), ``decision`` (words), ``job_row_matches`` (bool), ``verdict`` (words)};
- ``variants``: [{``variant_id``, ``partition``, ``row`` (null or {``job_id``, ``status``,
  ``current_step``}), ``stored`` (null or {``job_id``, ``version``, ``status``, ``step``, ``removed``,
  ``problem``, ``event_id``}), ``baseline`` (null or the same shape as ``stored``: what prune folded),
  ``agreement`` (``agree``, ``in_flight``, ``disagree``), ``note``, ``events_total``, ``events_pending``,
  ``events_pruned`` (bool), ``open_transaction`` (null or {``pid``, ``application_name``, ``state``,
  ``since``, ``xid``, ``prepared_gid``, ``wrote_events``}), ``events``: [{``event_id``, ``txid``
  (int), ``job_id``, ``event_type``, ``version``, ``status``, ``step``, ``created_at``, ``state``
  (``applied``, ``applied_not_folded``, ``in_flight``, ``unknown``), ``stored`` (bool: the stored
  state is this event's), ``dead_letter`` (null or {``reason``, ``holds_job``, ``discarded``})}]}];
- ``dead_letters``: [{``event_id``, ``variant_id``, ``reason``, ``holds_job``, ``parked_at``,
  ``discarded_at``, ``event_type``, ``event_pruned``}];
- ``transitions``: [{``transition_id``, ``from_status``, ``from_step``, ``to_status``, ``to_step``,
  ``written_by``, ``transitioned_at``}], newest first.

Times are ISO 8601 strings, ids of jobs and variants UUID strings, event ids and txids integers.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass

from outbox.events import VariantStatus
from outbox.subscription import Transition
from processor import fold_config, store
from processor.errors import OutboxError, UnfoldableJobError
from processor.fold import FailurePolicy, JobState, Pipeline, VariantState, finished, fold_job
from processor.store import Connection

NAMED_AT_MOST = 3  # deciding variants named in the fold's words; the rest are counted
_STATUSES = {status.value: status for status in VariantStatus}


class EventState(enum.StrEnum):
    """What the checkpoint of its partition says of a committed event."""

    APPLIED = "applied"  # in its variant's state, and in job state
    APPLIED_NOT_FOLDED = "applied_not_folded"  # applied by a catch-up still open: its job is folded when it closes
    IN_FLIGHT = "in_flight"  # committed after the checkpoint's snapshot: the next batch applies it
    UNKNOWN = "unknown"  # its partition has no checkpoint (a repartition in progress)


class Agreement(enum.StrEnum):
    """Whether a variant's row and the processor's stored state of it say the same."""

    AGREE = "agree"
    IN_FLIGHT = "in_flight"  # they differ while events of the variant are pending: not drift
    DISAGREE = "disagree"  # they differ with nothing pending: `outbox verify --repair` resyncs it


@dataclass(frozen=True, slots=True)
class JobRow:
    status: str | None
    current_step: str | None
    updated_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Hold:
    status: str
    current_step: str | None
    reason: str
    held_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Flag:
    reason: str
    flagged_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class AwaitingFold:
    since: dt.datetime | None
    retry_at: dt.datetime | None  # set when its row was locked: the worker tries again then


@dataclass(frozen=True, slots=True)
class Backend:
    """A session of the server (a worker, or the holder of a lock)."""

    pid: int | None
    application_name: str | None
    state: str | None
    since: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Worker:
    pid: int
    application_name: str
    since: dt.datetime


@dataclass(frozen=True, slots=True)
class CheckpointView:
    partition: int
    done_snapshot: str | None
    catching_up_to: str | None
    updated_at: dt.datetime | None
    worker: Worker | None  # the session holding the partition's consumer lock


@dataclass(frozen=True, slots=True)
class FoldDecision:
    status: str | None
    current_step: str | None
    unfoldable: str | None
    decision: str
    job_row_matches: bool
    verdict: str


@dataclass(frozen=True, slots=True)
class VariantRow:
    job_id: uuid.UUID | None
    status: str | None
    current_step: str | None


@dataclass(frozen=True, slots=True)
class StoredState:
    job_id: uuid.UUID
    version: int
    status: str | None
    step: str | None
    removed: bool
    problem: str | None
    event_id: int


@dataclass(frozen=True, slots=True)
class OpenTransaction:
    """An open transaction that holds a variant's row: what it changed, and its events, are invisible until it ends."""

    pid: int | None
    application_name: str | None
    state: str | None
    since: dt.datetime | None
    xid: str
    prepared_gid: str | None
    wrote_events: bool  # it holds the lock that writing to outbox_events takes

    def describe(self) -> str:
        who = (
            f"prepared transaction {self.prepared_gid!r}"
            if self.prepared_gid is not None
            else f"backend pid {self.pid} ({self.application_name or 'no application_name'}, {self.state})"
        )
        since = f", open since {describe_time(self.since)}" if self.since else ""
        what = (
            "has written to the outbox: its events stay invisible, and unapplied, until it commits"
            if self.wrote_events
            else "holds the row locked (no outbox write yet)"
        )
        return f"transaction {self.xid} of {who}{since} {what}"


@dataclass(frozen=True, slots=True)
class DeadLetterMark:
    reason: str
    holds_job: bool
    discarded: bool


@dataclass(frozen=True, slots=True)
class ExplainedEvent:
    event_id: int
    txid: int
    job_id: uuid.UUID | None
    event_type: str
    version: int | None
    status: str | None
    step: str | None
    created_at: dt.datetime
    state: EventState
    stored: bool
    dead_letter: DeadLetterMark | None


@dataclass(frozen=True, slots=True)
class ExplainedVariant:
    variant_id: uuid.UUID
    partition: int | None
    row: VariantRow | None
    stored: StoredState | None
    baseline: StoredState | None
    agreement: Agreement
    note: str
    events_total: int
    events_pending: int
    events_pruned: bool
    open_transaction: OpenTransaction | None
    events: tuple[ExplainedEvent, ...]


@dataclass(frozen=True, slots=True)
class ExplainedDeadLetter:
    event_id: int
    variant_id: uuid.UUID | None
    reason: str
    holds_job: bool
    parked_at: dt.datetime
    discarded_at: dt.datetime | None
    event_type: str | None
    event_pruned: bool


@dataclass(frozen=True, slots=True)
class ExplainedTransition:
    transition_id: int
    from_status: str | None
    from_step: str | None
    to_status: str
    to_step: str | None
    written_by: str
    transitioned_at: dt.datetime


@dataclass(frozen=True, slots=True)
class ExplainReport:
    job_id: uuid.UUID
    partition: int
    job: JobRow
    hold: Hold | None
    flag: Flag | None
    awaiting_fold: AwaitingFold | None
    row_lock: Backend | None
    checkpoint: CheckpointView
    fold: FoldDecision
    variants: tuple[ExplainedVariant, ...]
    dead_letters: tuple[ExplainedDeadLetter, ...]
    transitions: tuple[ExplainedTransition, ...]


def parse_job_id(text: str) -> uuid.UUID:
    """A job id from the command line; a one-line error if it is not a UUID."""
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise OutboxError(f"not a job id (a UUID): {text!r}") from None


def explain(conn: Connection, job_id: uuid.UUID, *, events: int = 20, transitions: int = 20) -> ExplainReport:
    """Everything that says why ``job_id`` is in its state, read in one snapshot."""
    with store.one_snapshot(conn):
        overview = store.job_overview_get(conn, job_id)
        if overview is None:
            raise OutboxError(f"no such job: {job_id}")
        config = fold_config.load(conn)
        holds = store.job_holds(conn, [job_id])
        row_locks = [h for h in store.jobs_lock_holders(conn, [job_id]) if h.pid is not None]
        worker = store.consumer_lock_holder(conn, overview.partition)
        inspected = store.job_variants_inspect(conn, job_id)
        recent = store.variant_events_recent(conn, [v.variant_id for v in inspected], events) if events else []
        fold_input = store.variant_states_to_fold(conn, [job_id]).get(job_id, [])
        letters = store.job_dead_letters_list(conn, job_id, limit=100)
        history = store.job_transitions_recent(conn, job_id, transitions)

    hold = holds.get(job_id)
    job = JobRow(overview.status, overview.current_step, overview.updated_at)
    awaiting = (
        AwaitingFold(overview.awaiting_fold_since, overview.awaiting_fold_retry_at)
        if overview.awaiting_fold_since is not None
        else None
    )
    checkpoint = CheckpointView(
        partition=overview.partition,
        done_snapshot=overview.done_snapshot,
        catching_up_to=overview.target_snapshot,
        updated_at=overview.checkpoint_updated_at,
        worker=Worker(worker.pid, worker.application_name, worker.since) if worker else None,
    )
    by_variant: dict[uuid.UUID, list[store.RecentEvent]] = {}
    for event in recent:
        by_variant.setdefault(event.variant_id, []).append(event)
    variants = tuple(_variant(v, by_variant.get(v.variant_id, [])) for v in inspected)
    row_lock = row_locks[0] if row_locks else None
    lock = Backend(row_lock.pid, row_lock.application_name, row_lock.state, row_lock.since) if row_lock else None
    seen = _Circumstances(
        job=job,
        hold=hold,
        awaiting=awaiting,
        row_lock=lock,
        checkpoint=checkpoint,
        pending=sum(v.events_pending for v in variants),
        held_back=[v for v in variants if v.open_transaction is not None],
    )
    decision = _decide(
        fold_input,
        [v for v in variants if v.stored is not None and v.stored.job_id == job_id],
        config.pipeline,
        config.policy,
        seen,
    )
    return ExplainReport(
        job_id=job_id,
        partition=overview.partition,
        job=job,
        hold=Hold(hold.status, hold.current_step, hold.reason, hold.held_at) if hold else None,
        flag=Flag(overview.flag_reason, overview.flagged_at) if overview.flag_reason is not None else None,
        awaiting_fold=awaiting,
        row_lock=lock,
        checkpoint=checkpoint,
        fold=decision,
        variants=variants,
        dead_letters=tuple(_dead_letter(d) for d in letters),
        transitions=tuple(_transition(t) for t in history),
    )


def _variant(v: store.VariantInspection, events: list[store.RecentEvent]) -> ExplainedVariant:
    row = VariantRow(v.row_job_id, v.row_status, v.row_step) if v.row_job_id is not None else None
    stored = _state(
        v.state_job_id, v.state_version, v.state_status, v.state_step, v.state_removed, v.state_problem,
        v.state_event_id,
    )  # fmt: skip
    baseline = _state(
        v.baseline_job_id, v.baseline_version, v.baseline_status, v.baseline_step, v.baseline_removed, None,
        v.baseline_event_id,
    )  # fmt: skip
    opened = None
    if v.writer_xid is not None:
        opened = OpenTransaction(
            v.writer_pid, v.writer_application_name, v.writer_state, v.writer_since, v.writer_xid,
            v.writer_prepared_gid, bool(v.writer_wrote_outbox),
        )  # fmt: skip
    agreement, note = _agreement(row, stored, v.events_pending)
    return ExplainedVariant(
        variant_id=v.variant_id,
        partition=v.partition,
        row=row,
        stored=stored,
        baseline=baseline,
        agreement=agreement,
        note=note,
        events_total=v.events_total,
        events_pending=v.events_pending,
        events_pruned=baseline is not None,  # prune folds what it deletes into the baseline
        open_transaction=opened,
        events=tuple(_event(e, stored) for e in events),
    )


def _state(
    job_id: uuid.UUID | None,
    version: int | None,
    status: str | None,
    step: str | None,
    removed: bool | None,
    problem: str | None,
    event_id: int | None,
) -> StoredState | None:
    if job_id is None or version is None or event_id is None:
        return None
    return StoredState(job_id, version, status, step, bool(removed), problem, event_id)


def _agreement(row: VariantRow | None, stored: StoredState | None, pending: int) -> tuple[Agreement, str]:
    """The variant's row against its stored state, as `outbox verify` compares them (in flight is not drift)."""
    said = None if stored is None or stored.removed else (stored.job_id, stored.status, stored.step)
    has = None if row is None else (row.job_id, row.status, row.current_step)
    if stored is not None and stored.problem is not None:
        return Agreement.DISAGREE, f"the stored state is a problem: {stored.problem}"
    if said == has:
        if has is not None:
            return Agreement.AGREE, ""
        if stored is not None:
            return Agreement.AGREE, "removed: the stored state is a tombstone"
        return Agreement.AGREE, "no row and no stored state: only its baseline (prune) remembers it"
    if pending:
        return Agreement.IN_FLIGHT, f"{pending} event(s) not applied yet: the worker brings the stored state in step"
    if stored is not None and row is not None and stored.job_id != row.job_id:
        return Agreement.DISAGREE, f"moved to job {row.job_id}, which the events do not say yet"
    return Agreement.DISAGREE, "no event says what the row says: `outbox verify --repair` resyncs it"


def _event(e: store.RecentEvent, stored: StoredState | None) -> ExplainedEvent:
    if e.applied is None:
        state = EventState.UNKNOWN
    elif not e.applied:
        state = EventState.IN_FLIGHT
    elif e.pending:
        state = EventState.APPLIED_NOT_FOLDED
    else:
        state = EventState.APPLIED
    mark = None
    if e.dead_letter_reason is not None:
        mark = DeadLetterMark(
            e.dead_letter_reason, bool(e.dead_letter_holds_job), e.dead_letter_discarded_at is not None
        )
    return ExplainedEvent(
        event_id=e.event_id,
        txid=int(e.txid),
        job_id=e.job_id,
        event_type=e.event_type,
        version=e.version,
        status=e.status,
        step=e.step,
        created_at=e.created_at,
        state=state,
        stored=stored is not None and stored.event_id == e.event_id,
        dead_letter=mark,
    )


def _dead_letter(d: store.JobDeadLetter) -> ExplainedDeadLetter:
    return ExplainedDeadLetter(
        d.event_id, d.variant_id, d.reason, d.holds_job, d.parked_at, d.discarded_at, d.event_type,
        event_pruned=d.event_type is None,
    )  # fmt: skip


def _transition(t: Transition) -> ExplainedTransition:
    return ExplainedTransition(
        t.transition_id, t.from_status, t.from_step, t.to_status, t.to_step, t.written_by, t.transitioned_at
    )


@dataclass(frozen=True, slots=True)
class _Circumstances:
    """What, besides the fold, tells why the job row is what it is."""

    job: JobRow
    hold: store.JobHold | None
    awaiting: AwaitingFold | None
    row_lock: Backend | None
    checkpoint: CheckpointView
    pending: int  # events of its variants not in job state yet
    held_back: list[ExplainedVariant]  # variants whose row an open transaction holds


def _decide(
    fold_input: list[VariantState],
    variants: list[ExplainedVariant],
    pipeline: Pipeline,
    policy: FailurePolicy,
    seen: _Circumstances,
) -> FoldDecision:
    """What the fold (processor.fold.fold_job, on the worker's own input) decides, in words, against the job row."""
    unfoldable: str | None = None
    try:
        state = fold_job(fold_input, pipeline, policy)
    except UnfoldableJobError as exc:
        state, unfoldable = None, str(exc)
    words = f"cannot be folded: {unfoldable}" if unfoldable else _words(state, variants, pipeline, policy)
    job = seen.job
    matches = state is not None and (job.status, job.current_step) == (state.status.value, state.current_step)
    verdict = _verdict(state, unfoldable, matches, seen)
    if seen.pending and seen.hold is None and unfoldable is None:
        verdict += _pending_note(matches, seen)
    verdict += _held_back_note(seen.held_back)
    return FoldDecision(
        state.status.value if state else None, state.current_step if state else None, unfoldable, words, matches,
        verdict,
    )  # fmt: skip


def _verdict(state: JobState | None, unfoldable: str | None, matches: bool, seen: _Circumstances) -> str:
    """Why the job row is what it is, first words: held, flagged, nothing to fold, the fold, or why not yet."""
    if seen.hold is not None:
        return (
            f"held by the application since {describe_time(seen.hold.held_at)} ({seen.hold.reason}): the processor "
            "leaves the row alone until `outbox.release_job` hands it back, then folds it from its variants"
        )
    if unfoldable is not None:
        advice = (
            "`outbox dead-letters retry` or `discard` the dead letter"
            if "dead letter" in unfoldable
            else "`outbox pipeline set` with the step, or fix the variant"
        )
        return f"flagged: the job row is left as it was ({_job(seen.job)}) until the cause goes ({advice})"
    if state is None:
        return "no live variant: the job row keeps its last state"
    if matches:
        return "the job row is the fold of its variants' stored states"
    return _not_yet_verdict(state, seen)


def _not_yet_verdict(state: JobState, seen: _Circumstances) -> str:
    """The job row differs from the fold: in flight (and why), or drift."""
    awaiting, row_lock = seen.awaiting, seen.row_lock
    if awaiting is not None and awaiting.retry_at is not None:
        locker = f" (by backend pid {row_lock.pid}, {row_lock.application_name})" if row_lock else ""
        return (
            f"the job row was locked{locker} when the worker wrote it: it tries again at "
            f"{describe_time(awaiting.retry_at)}"
        )
    if awaiting is not None:
        return "in flight: queued in outbox_dirty_jobs, the worker folds it next (after a catch-up or a change)"
    if seen.checkpoint.catching_up_to is not None:
        return "in flight: its partition is catching up; its jobs are folded when the catch-up is complete"
    if seen.pending:
        return f"in flight: {seen.pending} event(s) of its variants are not in job state yet"
    return (
        f"drift: the job row says {_job(seen.job)} but the fold of its variants' stored states gives "
        f"{_fold_state(state)}: `outbox verify --repair` rebuilds it"
    )


def _pending_note(matches: bool, seen: _Circumstances) -> str:
    """Events not applied yet: said when the row already matches, and when no worker will apply them."""
    note = f"; {seen.pending} newer event(s) of its variants are not in job state yet" if matches else ""
    if seen.checkpoint.worker is None:
        note += f"; no worker holds partition {seen.checkpoint.partition}: nothing applies them (`outbox run`)"
    return note


def _held_back_note(held_back: list[ExplainedVariant]) -> str:
    """What an open transaction holds back is not in any state yet: name who holds it."""
    note = ""
    for v in held_back[:NAMED_AT_MOST]:
        assert v.open_transaction is not None
        opened = v.open_transaction
        who = f"prepared transaction {opened.prepared_gid!r}" if opened.prepared_gid else f"backend pid {opened.pid}"
        since = f" (open since {describe_time(opened.since)})" if opened.since else ""
        note += (
            f"; a change of variant {v.variant_id} waits for transaction {opened.xid} of {who}{since} to end"
            if opened.wrote_events
            else f"; variant {v.variant_id} is locked by transaction {opened.xid} of {who}{since}"
        )
    if len(held_back) > NAMED_AT_MOST:
        note += f"; and {len(held_back) - NAMED_AT_MOST} more variants held by open transactions"
    return note


def _words(state: JobState | None, variants: list[ExplainedVariant], pipeline: Pipeline, policy: FailurePolicy) -> str:
    """The fold's decision in words, from its result and the variants' stored states."""
    if state is None:
        return "no live variant to fold"
    live = [_as_fold_state(v) for v in variants if v.stored is not None and not v.stored.removed]
    n = len(live)
    done = sum(1 for s in live if finished(s, pipeline))
    final = pipeline.final
    if state.status is VariantStatus.DONE:
        return f"done at `{final}`: all {_variants(n)} done at `{final}`"
    step = state.current_step
    # The variants that hold the job at its step: unfinished there, and (while the job still runs) not failed,
    # since under the settled policy a failed variant waits for the others rather than holding the job.
    unfinished = [s for s in live if not finished(s, pipeline)]
    if state.status is not VariantStatus.FAILED:
        unfinished = [s for s in unfinished if s.status is not VariantStatus.FAILED] or unfinished
    deciding = [s for s in unfinished if pipeline.rank(s.step) == pipeline.rank(step)] or unfinished
    named = ", ".join(
        f"variant {s.variant_id} is `{s.status.value if s.status else None}` at `{s.step or 'no step yet'}`"
        for s in deciding[:NAMED_AT_MOST]
    )
    if len(deciding) > NAMED_AT_MOST:
        named += f" and {len(deciding) - NAMED_AT_MOST} more at `{step}`"
    head = f"{state.status.value} at `{step}`: "
    if state.status is VariantStatus.QUEUED:
        return head + f"all {_variants(n)} queued, {named}"
    failed = sum(1 for s in live if s.status is VariantStatus.FAILED)
    if state.status is VariantStatus.FAILED:
        why = (
            "the first failure decides (failure policy immediate)"
            if policy is FailurePolicy.IMMEDIATE
            else "every variant has finished (failure policy settled)"
        )
        return head + f"{failed} of {_variants(n)} failed and {done} done at `{final}`; {why}; {named}"
    waiting = f"; {failed} failed, the job waits for the others (failure policy settled)" if failed else ""
    return head + f"{done} of {_variants(n)} done at `{final}`, {named}{waiting}"


def _variants(n: int) -> str:
    return f"{n} variant" if n == 1 else f"{n} variants"


def _as_fold_state(v: ExplainedVariant) -> VariantState:
    assert v.stored is not None
    status = _STATUSES.get(v.stored.status) if v.stored.status is not None else None
    return VariantState(v.variant_id, v.stored.job_id, v.stored.version, status, v.stored.step, v.stored.removed)


def _job(job: JobRow) -> str:
    return describe_at(job.status, job.current_step)


def _fold_state(state: JobState) -> str:
    return describe_at(state.status.value, state.current_step)


def describe_at(status: str | None, step: str | None) -> str:
    """``running at segment``; a status alone where there is no step yet."""
    return f"{status} at {step}" if step is not None else f"{status}"


def describe_time(value: dt.datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"
