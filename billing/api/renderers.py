"""CSV for statements and usage exports (?format=csv), and PDF for invoices (?format=pdf)."""

import csv
import io

from rest_framework.renderers import BaseRenderer


class CsvRenderer(BaseRenderer):
    """Renders {"csv_columns": [...], "csv_rows": [[...], ...]} as CSV; an error body as field,message lines."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if isinstance(data, dict) and "csv_columns" in data:
            writer.writerow(data["csv_columns"])
            writer.writerows(data["csv_rows"])
        elif isinstance(data, dict):
            writer.writerow(["field", "message"])
            for field, messages in data.items():
                for message in messages if isinstance(messages, list) else [messages]:
                    writer.writerow([field, str(message)])
        return out.getvalue().encode(self.charset)


class PdfRenderer(BaseRenderer):
    media_type = "application/pdf"
    format = "pdf"
    charset = None
    render_style = "binary"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, bytes | bytearray):
            return bytes(data)
        return str(data).encode()
