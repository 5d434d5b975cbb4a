import time

from allauth.mfa import app_settings
from allauth.mfa.totp.internal.auth import format_hotp_value, hotp_value
from django.core.management.base import BaseCommand

from tenants.management.commands.seed_demo import STAFF_TOTP_SECRET


class Command(BaseCommand):
    help = "Print the current TOTP code of the demo staff login (demo only)."

    def handle(self, *args, **options):
        counter = int(time.time()) // app_settings.TOTP_PERIOD
        self.stdout.write(format_hotp_value(hotp_value(STAFF_TOTP_SECRET, counter)))
