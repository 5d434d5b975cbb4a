"""settings.CELERY_BEAT_SCHEDULE, run inside the web process for the embedded default.

In production `celery beat` sends these tasks to the workers. `make run` has no beat or worker
(one process, tasks inline), so a daemon thread in the web process ticks the same tasks.
"""

import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)


def _run_forever(stop: threading.Event) -> None:
    schedule = {entry["task"]: float(entry["schedule"]) for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    due = dict.fromkeys(schedule, 0.0)
    while not stop.is_set():
        now = time.monotonic()
        for path, every in schedule.items():
            if now >= due[path]:
                due[path] = now + every
                try:
                    import_string(path)()  # called directly: this thread is the worker
                except Exception:  # one failing task must not stop the others
                    logger.exception("Embedded beat: %s failed", path)
                finally:
                    close_old_connections()
        stop.wait(1.0)


_started = threading.Event()


def start_embedded_beat() -> threading.Event | None:
    """Start the ticking thread once per process. Returns the event that stops it."""
    if _started.is_set():
        return None
    _started.set()
    stop = threading.Event()
    threading.Thread(target=_run_forever, args=(stop,), name="embedded-beat", daemon=True).start()
    logger.info("Embedded beat started: %s", ", ".join(settings.CELERY_BEAT_SCHEDULE))
    return stop
