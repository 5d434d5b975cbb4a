"""Settings for bench/live.py: the portal's own, with a channel-layer prefix of the run's own.

The prefix (BENCH_LIVE_CHANNEL_PREFIX) keeps the benchmark's groups and inboxes apart from anything
else on the same Redis. Needs REDIS_URL, which selects the Redis channel layer. Two optional knobs
try a different channel-layer configuration without touching the portal's: BENCH_LIVE_CAPACITY
(channels_redis capacity) and BENCH_LIVE_REDIS_MAX_CONNECTIONS (the redis-py pool's
max_connections).
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
