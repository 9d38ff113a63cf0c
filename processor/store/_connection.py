"""The connection type every store function takes (one definition for the store's modules)."""

from typing import Any

import psycopg

Connection = psycopg.Connection[Any]
