"""The processor's database operations: every statement it runs, one module per concern.

Each concern is a module and its SQL file side by side (``events.py`` and ``events.sql``), as River keeps
one query file per table: checkpoint, events, variant states, jobs, dead letters, partitions and locks,
migrations and the catalog. Every other module goes through these functions; none runs SQL of its own.
Rows come back as frozen dataclasses (psycopg ``class_row``), never as tuples read by position.
"""

from processor.store._core import *  # noqa: F403  (moved concern by concern into the modules beside it)
from processor.store._core import QUERIES, Connection  # noqa: F401
