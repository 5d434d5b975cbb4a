"""Settings for bench/live.py: the portal's own, with a channel-layer prefix of the run's own.

The prefix (BENCH_LIVE_CHANNEL_PREFIX) keeps the benchmark's groups and inboxes apart from anything
else on the same Redis. Needs REDIS_URL, which selects the Redis channel layer.
"""

import os

from portal.settings import *  # noqa: F403
from portal.settings import CHANNEL_LAYERS

CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = os.environ["BENCH_LIVE_CHANNEL_PREFIX"]
