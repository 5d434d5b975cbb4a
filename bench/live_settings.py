"""Settings for bench/live.py: the portal's own, with a channel-layer prefix of the run's own.

The prefix (BENCH_LIVE_CHANNEL_PREFIX) keeps the benchmark's groups and inboxes apart from anything
else on the same Redis. Needs REDIS_URL, which selects the Redis channel layer. Two optional knobs
try a different channel-layer configuration without touching the portal's: BENCH_LIVE_CAPACITY
(channels_redis capacity, default 100) and BENCH_LIVE_REDIS_MAX_CONNECTIONS (the redis-py pool's
max_connections, default 100 in redis-py 8); BENCH_LIVE_LEAN_DISPATCH tries TaskConsumer without
channels' per-message hop to the sync thread (see below).
"""

import os

from portal.settings import *  # noqa: F403
from portal.settings import CHANNEL_LAYERS

CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = os.environ["BENCH_LIVE_CHANNEL_PREFIX"]
if os.environ.get("BENCH_LIVE_CAPACITY"):
    CHANNEL_LAYERS["default"]["CONFIG"]["capacity"] = int(os.environ["BENCH_LIVE_CAPACITY"])
if os.environ.get("BENCH_LIVE_REDIS_MAX_CONNECTIONS"):
    for host in CHANNEL_LAYERS["default"]["CONFIG"]["hosts"]:
        host["max_connections"] = int(os.environ["BENCH_LIVE_REDIS_MAX_CONNECTIONS"])

if os.environ.get("BENCH_LIVE_LEAN_DISPATCH"):
    # What-if, never the default: channels 4.3's AsyncConsumer.dispatch awaits close_old_connections on the
    # one sync thread before every handler. TaskConsumer.task_events touches the database only through
    # database_sync_to_async (which closes old connections itself), so let it skip that hop.
    from channels.consumer import AsyncConsumer, get_handler_name

    _dispatch = AsyncConsumer.dispatch

    async def _lean_dispatch(self, message):
        if message["type"] == "task.events":
            return await getattr(self, get_handler_name(message))(message)
        return await _dispatch(self, message)

    AsyncConsumer.dispatch = _lean_dispatch
