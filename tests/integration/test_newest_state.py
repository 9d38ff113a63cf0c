"""The one rule for a variant's newest state (outbox_state_newer, outbox_variant_states_newest):
whatever the order, duplication and batching of its candidate states, the stored state is the one
with the highest version (then event id), and a merge never moves a state back.

Checked against the rule's Python home (processor.fold.newest_states) over the same candidates, on a
real database: the two homes agree.
"""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.database import connect
from processor.fold import VariantState, newest_states

VARIANTS = [uuid.UUID(int=10 + i) for i in range(3)]
JOBS = [uuid.UUID(int=100 + i) for i in range(2)]

# (variant, job, version, removed); each candidate gets its own event id (its index), and a few
# share a version: only hand-written events do, and the event id then decides.
candidate_st = st.tuples(st.sampled_from(VARIANTS), st.sampled_from(JOBS), st.integers(1, 5), st.booleans())

MERGE = """
SELECT count(*)
FROM outbox_variant_states_merge_v1(ARRAY(
    SELECT (v, j, ver, CASE WHEN rm THEN NULL ELSE 'running' END, NULL, rm, NULL, ev, NULL)::outbox_variant_states
    FROM unnest(%s::uuid[], %s::uuid[], %s::bigint[], %s::boolean[], %s::bigint[]) AS t (v, j, ver, rm, ev)
))
"""


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(candidates=st.lists(candidate_st, min_size=1, max_size=14), data=st.data())
def test_merging_in_any_order_and_batches_keeps_the_newest(db, candidates, data):
    numbered = [(*candidate, index + 1) for index, candidate in enumerate(candidates)]
    shuffled = data.draw(st.permutations(numbered))
    cut = data.draw(st.integers(0, len(shuffled)))
    with connect(db, application_name="outbox-tests", autocommit=False) as conn:
        for batch in (shuffled[:cut], shuffled[cut:], shuffled[: cut // 2]):  # the last: duplicates, late
            columns = [list(column) for column in zip(*batch, strict=True)] if batch else [[] for _ in range(5)]
            conn.execute(MERGE, columns)
        stored = {
            row[0]: tuple(row[1:])
            for row in conn.execute("SELECT variant_id, job_id, version, removed, event_id FROM outbox_variant_states")
        }
        conn.rollback()
    expected: dict[uuid.UUID, tuple[object, ...]] = {}  # the independent oracle: max((version, event_id))
    for variant, job, version, removed, event_id in numbered:
        best = expected.get(variant)
        if best is None or (version, event_id) > (best[1], best[3]):
            expected[variant] = (job, version, removed, event_id)
    assert stored == expected
    # And the production rule (processor.fold.newest_states) agrees with the SQL merge.
    newest = newest_states(
        (VariantState(variant, job, version, None, None, removed), event_id)
        for variant, job, version, removed, event_id in numbered
    )
    folded = {variant: (s.job_id, s.version, s.removed, event_id) for variant, (s, event_id) in newest.items()}
    assert stored == folded
