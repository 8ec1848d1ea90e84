"""Persistent state: runs, step checkpoints, the output cache, leases and event logs.

This package owns diskcache (nothing else in storyflow imports it); the key scheme
and the store format version live in ``_store.py``. A record that does not read back
is a `Damage`, named and never misread (``_damage.py``); `Store.check_integrity`
checks the whole store for `storyflow doctor` (``_integrity.py``); `Store.gc` removes old
runs for `storyflow gc` (``_gc.py``); an older store is migrated on open (``_migrate.py``).
"""

from __future__ import annotations

from storyflow.store._damage import Damage, LostRun, RunListing
from storyflow.store._events_log import EventLog, follow_events, read_events
from storyflow.store._gc import GcReport, GcRun, Spared
from storyflow.store._integrity import Finding
from storyflow.store._lease import Holder, Lease, request_cancel
from storyflow.store._records import RunRecord, StepRecord
from storyflow.store._redact import redact
from storyflow.store._store import MIGRATIONS, STORE_FORMAT, Store
from storyflow.store._walk import descendants, instance_records

__all__ = [
    "MIGRATIONS",
    "STORE_FORMAT",
    "Damage",
    "EventLog",
    "Finding",
    "GcReport",
    "GcRun",
    "Holder",
    "Lease",
    "LostRun",
    "RunListing",
    "RunRecord",
    "Spared",
    "StepRecord",
    "Store",
    "descendants",
    "follow_events",
    "instance_records",
    "read_events",
    "redact",
    "request_cancel",
]
