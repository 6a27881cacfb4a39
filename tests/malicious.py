"""A pickle that runs a shell command when unpickled: what a tampered checkpoint would hold."""

from __future__ import annotations

import os
from pathlib import Path


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
