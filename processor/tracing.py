"""The worker's span for each batch (outbox.tracing says how one trace goes from a writer to a subscriber).

A batch applies the events of many writers, each in a trace of its own: its span is not a child of
any of them but links to them, to at most MAX_LINKS distinct trace contexts (a batch of 5,000
events could carry 5,000); ``outbox.traced_jobs`` says how many jobs of the batch had one.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import trace

from outbox.tracing import ConsumerSpan, span_context_of

MAX_LINKS = 32


def batch_span(partition: int) -> ConsumerSpan:
    """The span of one batch: around its transaction, from the first read to the commit."""
    return ConsumerSpan("outbox.batch", attributes=lambda: {"outbox.partition": partition})


def link_events(span: trace.Span, trace_parents: Iterable[str]) -> None:
    """Link the batch's span to the trace contexts of the events it read (the writers'), at most MAX_LINKS."""
    if not span.is_recording():
        return
    linked: set[str] = set()
    traced = 0
    for traceparent in trace_parents:
        traced += 1
        if len(linked) < MAX_LINKS and traceparent not in linked:
            span_context = span_context_of(traceparent)
            if span_context is not None:
                linked.add(traceparent)
                span.add_link(span_context)
    span.set_attribute("outbox.traced_jobs", traced)


def batch_outcome(span: trace.Span, *, events: int, jobs_changed: int, dead_letters: int) -> None:
    """What the batch did, on its span (before the commit that ends it)."""
    if span.is_recording():
        span.set_attributes(
            {"outbox.events": events, "outbox.jobs_changed": jobs_changed, "outbox.dead_letters": dead_letters}
        )
