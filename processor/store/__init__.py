"""The processor's database operations: every statement it runs, one module per concern.

Each concern is a module and its SQL file side by side (``events.py`` and ``events.sql``), as River keeps
one query file per table: checkpoint, events, variant states, jobs, dead letters, partitions and locks,
migrations and the catalog. Every other module goes through these functions; none runs SQL of its own.
Rows come back as frozen dataclasses (psycopg ``class_row``), never as tuples read by position.
"""

from processor.store import catalog as catalog  # the catalog concern, called as catalog.x (schema_check, app_schema)
from processor.store import migrations as migrations  # the schema's bookkeeping (migrate, fold_config)
from processor.store._connection import Connection as Connection
from processor.store.checkpoint import (
    Checkpoint as Checkpoint,
)
from processor.store.checkpoint import (
    CommitResult as CommitResult,
)
from processor.store.checkpoint import (
    LockedCheckpoint as LockedCheckpoint,
)
from processor.store.checkpoint import (
    batch_commit as batch_commit,
)
from processor.store.checkpoint import (
    checkpoint_get as checkpoint_get,
)
from processor.store.checkpoint import (
    checkpoint_lock as checkpoint_lock,
)
from processor.store.checkpoint import (
    checkpoints_lock_all as checkpoints_lock_all,
)
from processor.store.dead_letters import (
    DeadLetterEvent as DeadLetterEvent,
)
from processor.store.dead_letters import (
    DeadLetterRecord as DeadLetterRecord,
)
from processor.store.dead_letters import (
    DiscardedLetter as DiscardedLetter,
)
from processor.store.dead_letters import (
    JobDeadLetter as JobDeadLetter,
)
from processor.store.dead_letters import (
    dead_letter_delete as dead_letter_delete,
)
from processor.store.dead_letters import (
    dead_letter_discard as dead_letter_discard,
)
from processor.store.dead_letters import (
    dead_letter_event_get as dead_letter_event_get,
)
from processor.store.dead_letters import (
    dead_letter_reason_update as dead_letter_reason_update,
)
from processor.store.dead_letters import (
    dead_letters_list as dead_letters_list,
)
from processor.store.dead_letters import (
    dead_letters_park as dead_letters_park,
)
from processor.store.dead_letters import (
    dead_letters_partitions as dead_letters_partitions,
)
from processor.store.dead_letters import (
    job_dead_letters_list as job_dead_letters_list,
)
from processor.store.events import (
    AppliedEvents as AppliedEvents,
)
from processor.store.events import (
    PendingSummary as PendingSummary,
)
from processor.store.events import (
    events_apply as events_apply,
)
from processor.store.events import (
    events_get as events_get,
)
from processor.store.events import (
    events_pending_summary as events_pending_summary,
)
from processor.store.events import (
    events_probe as events_probe,
)
from processor.store.events import (
    work_pending as work_pending,
)
from processor.store.inspection import (
    HealthCounts as HealthCounts,
)
from processor.store.inspection import (
    InFlight as InFlight,
)
from processor.store.inspection import (
    JobFlag as JobFlag,
)
from processor.store.inspection import (
    JobOverview as JobOverview,
)
from processor.store.inspection import (
    PartitionCounts as PartitionCounts,
)
from processor.store.inspection import (
    RecentEvent as RecentEvent,
)
from processor.store.inspection import (
    StuckJob as StuckJob,
)
from processor.store.inspection import (
    VariantDriftRow as VariantDriftRow,
)
from processor.store.inspection import (
    VariantInspection as VariantInspection,
)
from processor.store.inspection import (
    WorkerSession as WorkerSession,
)
from processor.store.inspection import (
    backlog_counts_get as backlog_counts_get,
)
from processor.store.inspection import (
    health_counts_get as health_counts_get,
)
from processor.store.inspection import (
    in_flight_get as in_flight_get,
)
from processor.store.inspection import (
    job_flags_list as job_flags_list,
)
from processor.store.inspection import (
    job_ids_with_state_after as job_ids_with_state_after,
)
from processor.store.inspection import (
    job_overview_get as job_overview_get,
)
from processor.store.inspection import (
    job_variants_inspect as job_variants_inspect,
)
from processor.store.inspection import (
    stuck_jobs_list as stuck_jobs_list,
)
from processor.store.inspection import (
    variant_drift_list as variant_drift_list,
)
from processor.store.inspection import (
    variant_events_recent as variant_events_recent,
)
from processor.store.inspection import (
    variant_resync as variant_resync,
)
from processor.store.inspection import (
    worker_sessions_list as worker_sessions_list,
)
from processor.store.jobs import (
    JobHold as JobHold,
)
from processor.store.jobs import (
    JobsTaken as JobsTaken,
)
from processor.store.jobs import (
    JobsWritten as JobsWritten,
)
from processor.store.jobs import (
    RowLockHolder as RowLockHolder,
)
from processor.store.jobs import (
    StoredJob as StoredJob,
)
from processor.store.jobs import (
    job_holds as job_holds,
)
from processor.store.jobs import (
    job_ids_all as job_ids_all,
)
from processor.store.jobs import (
    job_ids_existing as job_ids_existing,
)
from processor.store.jobs import (
    job_ids_in_partition as job_ids_in_partition,
)
from processor.store.jobs import (
    job_ids_with_events_since as job_ids_with_events_since,
)
from processor.store.jobs import (
    jobs_awaiting_fold_add as jobs_awaiting_fold_add,
)
from processor.store.jobs import (
    jobs_awaiting_fold_add_applied as jobs_awaiting_fold_add_applied,
)
from processor.store.jobs import (
    jobs_awaiting_fold_add_flagged as jobs_awaiting_fold_add_flagged,
)
from processor.store.jobs import (
    jobs_awaiting_fold_exist as jobs_awaiting_fold_exist,
)
from processor.store.jobs import (
    jobs_awaiting_fold_take as jobs_awaiting_fold_take,
)
from processor.store.jobs import (
    jobs_get as jobs_get,
)
from processor.store.jobs import (
    jobs_lock_holders as jobs_lock_holders,
)
from processor.store.jobs import (
    jobs_write as jobs_write,
)
from processor.store.jobs import (
    transitions_append as transitions_append,
)
from processor.store.monitoring import (
    EventWriter as EventWriter,
)
from processor.store.monitoring import (
    dead_letters_count_by_class as dead_letters_count_by_class,
)
from processor.store.monitoring import (
    event_writers_list as event_writers_list,
)
from processor.store.monitoring import (
    job_flags_count as job_flags_count,
)
from processor.store.monitoring import (
    throughput_prune as throughput_prune,
)
from processor.store.partitions import (
    CONSUMER_LOCK_CLASS as CONSUMER_LOCK_CLASS,
)
from processor.store.partitions import (
    ELECTION_LOCK_CLASS as ELECTION_LOCK_CLASS,
)
from processor.store.partitions import (
    MEMBER_LOCK_CLASS as MEMBER_LOCK_CLASS,
)
from processor.store.partitions import (
    MIGRATIONS_LOCK_KEY as MIGRATIONS_LOCK_KEY,
)
from processor.store.partitions import (
    REPARTITION_LOCK_KEY as REPARTITION_LOCK_KEY,
)
from processor.store.partitions import (
    SUBSCRIBER_LOCK_CLASS as SUBSCRIBER_LOCK_CLASS,
)
from processor.store.partitions import (
    TRANSITIONS_LOCK_KEY as TRANSITIONS_LOCK_KEY,
)
from processor.store.partitions import (
    ClusterCheck as ClusterCheck,
)
from processor.store.partitions import (
    ClusterDuty as ClusterDuty,
)
from processor.store.partitions import (
    LockHolder as LockHolder,
)
from processor.store.partitions import (
    cluster_check as cluster_check,
)
from processor.store.partitions import (
    consumer_lock_holder as consumer_lock_holder,
)
from processor.store.partitions import (
    consumer_lock_holders as consumer_lock_holders,
)
from processor.store.partitions import (
    consumer_lock_release as consumer_lock_release,
)
from processor.store.partitions import (
    consumer_lock_try as consumer_lock_try,
)
from processor.store.partitions import (
    election_lock_try as election_lock_try,
)
from processor.store.partitions import (
    members_count as members_count,
)
from processor.store.partitions import (
    members_join as members_join,
)
from processor.store.partitions import (
    partitions_get as partitions_get,
)
from processor.store.partitions import (
    rebase_anchor as rebase_anchor,
)
from processor.store.partitions import (
    rebase_done as rebase_done,
)
from processor.store.partitions import (
    rebase_lock_events as rebase_lock_events,
)
from processor.store.partitions import (
    repartition_catch_ups_count as repartition_catch_ups_count,
)
from processor.store.partitions import (
    repartition_hold_writers as repartition_hold_writers,
)
from processor.store.partitions import (
    repartition_serialise as repartition_serialise,
)
from processor.store.partitions import (
    repartition_switch as repartition_switch,
)
from processor.store.partitions import (
    snapshot_current as snapshot_current,
)
from processor.store.partitions import (
    transaction_lock_timeout as transaction_lock_timeout,
)
from processor.store.partitions import (
    transaction_statement_timeout as transaction_statement_timeout,
)
from processor.store.partitions import (
    wakeup_listen as wakeup_listen,
)
from processor.store.partitions import (
    wakeup_trigger_enabled as wakeup_trigger_enabled,
)
from processor.store.partitions import (
    wakeup_trigger_set as wakeup_trigger_set,
)
from processor.store.retention import (
    FoldedChunk as FoldedChunk,
)
from processor.store.retention import (
    Segmented as Segmented,
)
from processor.store.retention import (
    SegmentHolder as SegmentHolder,
)
from processor.store.retention import (
    SegmentSurvey as SegmentSurvey,
)
from processor.store.retention import (
    cutoff_get as cutoff_get,
)
from processor.store.retention import (
    events_segment_fold as events_segment_fold,
)
from processor.store.retention import (
    events_segment_survey as events_segment_survey,
)
from processor.store.retention import (
    events_segment_truncate as events_segment_truncate,
)
from processor.store.retention import (
    lock_timeout_local as lock_timeout_local,
)
from processor.store.retention import (
    outbox_analyze as outbox_analyze,
)
from processor.store.retention import (
    segment_holder as segment_holder,
)
from processor.store.retention import (
    segments_closed as segments_closed,
)
from processor.store.retention import (
    segments_due as segments_due,
)
from processor.store.retention import (
    segments_rotate as segments_rotate,
)
from processor.store.retention import (
    transitions_segment_count as transitions_segment_count,
)
from processor.store.retention import (
    transitions_segment_truncate as transitions_segment_truncate,
)
from processor.store.session import (
    backend_pid as backend_pid,
)
from processor.store.session import (
    one_snapshot as one_snapshot,
)
from processor.store.session import (
    session_configure as session_configure,
)
from processor.store.transitions import (
    SubscriptionFailure as SubscriptionFailure,
)
from processor.store.transitions import (
    SubscriptionInfo as SubscriptionInfo,
)
from processor.store.transitions import (
    job_transitions_recent as job_transitions_recent,
)
from processor.store.transitions import (
    subscription_create as subscription_create,
)
from processor.store.transitions import (
    subscription_drop as subscription_drop,
)
from processor.store.transitions import (
    subscription_failures_list as subscription_failures_list,
)
from processor.store.transitions import (
    subscription_reset as subscription_reset,
)
from processor.store.transitions import (
    subscription_unpark as subscription_unpark,
)
from processor.store.transitions import (
    subscriptions_list as subscriptions_list,
)
from processor.store.transitions import (
    transitions_list as transitions_list,
)
from processor.store.transitions import (
    transitions_listen as transitions_listen,
)
from processor.store.variant_states import (
    replay_variants_of_jobs as replay_variants_of_jobs,
)
from processor.store.variant_states import (
    variant_states_rebuild as variant_states_rebuild,
)
from processor.store.variant_states import (
    variant_states_to_fold as variant_states_to_fold,
)
from processor.store.variant_states import (
    variant_states_upsert as variant_states_upsert,
)
