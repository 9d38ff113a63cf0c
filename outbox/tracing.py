"""OpenTelemetry tracing, through ``opentelemetry-api`` only: a no-op unless the process configures an SDK.

One trace (with links) follows a variant update to the reaction it caused (docs/operations.md, "Tracing"):

- the write API (outbox.writer) puts the W3C ``traceparent`` of the caller's span, when there is
  one, in a setting local to the caller's transaction, and capture copies it into the event's
  ``trace_parent`` (migration 0013);
- the worker's span for each batch (``outbox.batch``, processor.tracing) links to the trace
  contexts of the events it applied, and the transitions it writes carry their event's;
- a subscriber's span for each handler call (``outbox.handle``, below) is a child of the
  transition's trace context: in the writer's trace.

With no SDK configured, ``get_tracer`` hands out a tracer whose spans record nothing; nothing is
written to ``trace_parent`` then, unless the caller's context came from elsewhere (an incoming
request's ``traceparent`` header extracted by an instrumentation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from outbox.subscription import Transition

# A ProxyTracer: it follows the tracer provider the application sets, even later than this import.
tracer = trace.get_tracer("pg-outbox-processor")

_PROPAGATOR = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C traceparent of the caller's current span; None without a valid one (no SDK, no span)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def context_of(traceparent: str | None) -> Context | None:
    """The context whose parent span is ``traceparent``; None for none, or a value that does not parse."""
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def span_context_of(traceparent: str | None) -> trace.SpanContext | None:
    """The span context ``traceparent`` names (for a link); None as for ``context_of``."""
    context = context_of(traceparent)
    return None if context is None else trace.get_current_span(context).get_span_context()


class ConsumerSpan:
    """A span around a block (``with ConsumerSpan(...) as span``), current within it, ended with an
    error status and the exception recorded if the block raises.

    Without an SDK and without a parent the span is invalid: nothing is made current then, and
    ``attributes`` (a function, so that nothing is built for a span that records nothing) is not
    called. A class rather than a generator: the no-op path costs about 1.5 microseconds a block.
    """

    __slots__ = ("_attributes", "_context", "_name", "_use")

    def __init__(
        self,
        name: str,
        context: Context | None = None,
        attributes: Callable[[], Mapping[str, AttributeValue]] | None = None,
    ) -> None:
        self._name = name
        self._context = context
        self._attributes = attributes
        self._use: AbstractContextManager[trace.Span] | None = None

    def __enter__(self) -> trace.Span:
        span = tracer.start_span(self._name, context=self._context, kind=trace.SpanKind.CONSUMER)
        if not span.get_span_context().is_valid:
            return span
        if self._attributes is not None and span.is_recording():
            span.set_attributes(self._attributes())
        self._use = trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True)
        return self._use.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool | None:
        return None if self._use is None else self._use.__exit__(kind, exc, traceback)


def handler_span(subscription: str, transition: Transition) -> ConsumerSpan:
    """The span of one handler call: a child of the transition's trace context (the writer's), if any."""
    return ConsumerSpan(
        "outbox.handle",
        context_of(transition.trace_parent),
        lambda: {
            "outbox.subscription": subscription,
            "outbox.transition_id": transition.transition_id,
            "outbox.job_id": str(transition.job_id),
            "outbox.to_status": transition.to_status,
            "outbox.attempt": transition.attempt,
        },
    )
