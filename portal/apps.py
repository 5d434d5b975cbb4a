import os
import sys

from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"

    def ready(self):
        from django.conf import settings

        # Only the serving process ticks (not the autoreloader's parent, not management commands).
        serving = "runserver" in sys.argv and os.environ.get("RUN_MAIN") == "true"
        if settings.PORTAL_EMBEDDED_BEAT and serving:
            from portal.beat import start_embedded_beat

            start_embedded_beat()
