"""A bounded, thread-safe map that forgets what was used least recently."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class Recent:
    """At most `capacity` entries; `get` counts as a use. Shared by the threads of one server."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
