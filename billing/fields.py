"""Exact decimals for quantities and unrounded amounts.

SQLite keeps only 15 significant digits of a DECIMAL column (it stores a REAL), which is not
enough for per-second quantities and the unrounded sums of many of them. This field is NUMERIC
on PostgreSQL and TEXT on SQLite, and always reads back the exact Decimal that was written.
"""

from decimal import Decimal

from django.db import models


class ExactDecimalField(models.DecimalField):
    def db_type(self, connection):
        if connection.vendor == "sqlite":
            return "text"
        return f"numeric({self.max_digits}, {self.decimal_places})"

    def get_internal_type(self):
        # Not "DecimalField": SQLite's converter would read it back through a float.
        return "ExactDecimalField"

    def rel_db_type(self, connection):
        return self.db_type(connection)

    def get_db_prep_value(self, value, connection, prepared=False):
        if hasattr(value, "as_sql") or hasattr(value, "resolve_expression"):
            return value
        value = self.to_python(value)
        if value is None:
            return None
        value = value.quantize(Decimal(1).scaleb(-self.decimal_places))
        if connection.vendor == "sqlite":
            return format(value, "f")
        return value

    def get_db_prep_save(self, value, connection):
        return self.get_db_prep_value(value, connection)

    def from_db_value(self, value, expression, connection):
        if value is None:
            return None
        return Decimal(str(value)) if not isinstance(value, Decimal) else value
