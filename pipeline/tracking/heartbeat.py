"""A run's signs of life: who works on it (pid, host) and a heartbeat tag refreshed while it is open."""

from __future__ import annotations

import os
import socket
import threading
import time

import mlflow

from pipeline.config import HEARTBEAT_INTERVAL_S
from pipeline.tracking.names import HEARTBEAT_TAG, HOSTNAME_TAG, PID_TAG


def liveness_tags() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.0f}", PID_TAG: str(os.getpid()), HOSTNAME_TAG: socket.gethostname()}


class Heartbeat:
    """Refreshes a run's heartbeat tag from a daemon thread until stopped."""

    def __init__(self, run_id: str, interval: float = HEARTBEAT_INTERVAL_S):
        self.run_id, self.interval = run_id, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        client = mlflow.MlflowClient()
        while not self.stopped.wait(self.interval):
            try:
                client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception:  # a store busy for a moment must not break the stage; the next beat retries
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
