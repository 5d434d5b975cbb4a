"""Invoice PDFs with Chinese text: fpdf2 embeds (a subset of) a CJK TrueType font.

The font comes from settings.PORTAL_INVOICE_FONT (Debian's fonts-wqy-zenhei by default). Without
it a PDF cannot show Chinese, so generating one raises a clear error instead of printing boxes.
"""

import logging
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from fpdf import FPDF

from billing import selectors
from billing.models import Invoice

logging.getLogger("fontTools.subset").setLevel(logging.ERROR)

FONT = "cjk"


def _money(value) -> str:
    return f"{value:,.2f}"


def invoice_pdf_bytes(invoice: Invoice) -> bytes:
    font_path = Path(settings.PORTAL_INVOICE_FONT)
    if not font_path.exists():
        raise ImproperlyConfigured(
            f"Invoice PDFs need a Chinese TrueType font at {font_path} (apt-get install fonts-wqy-zenhei, "
            "or set PORTAL_INVOICE_FONT)."
        )
    tenant = invoice.tenant
    lines = list(invoice.lines.order_by("kind", "resource", "id"))
    paid = selectors.invoice_payments(invoice)
    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(f"Invoice {invoice.number or 'draft'}")
    pdf.set_author("GPU Portal")
    if font_path.suffix.lower() == ".ttc":
        pdf.add_font(FONT, fname=str(font_path), collection_font_number=0)
    else:
        pdf.add_font(FONT, fname=str(font_path))
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font(FONT, size=18)
    pdf.cell(0, 10, "发票 Invoice", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT, size=10)
    status = "正式 Final" if invoice.is_final else "草稿（本月未结） Draft (month still open)"
    rows = [
        ("发票号 Number", invoice.number or "—"),
        ("客户 Customer", f"{tenant.name} ({tenant.slug})"),
        ("账期 Period", f"{invoice.period_start:%Y-%m-%d} – {invoice.period_end:%Y-%m-%d} ({invoice.time_zone})"),
        ("状态 Status", status),
        ("币种 Currency", "CNY 人民币"),
    ]
    for label, value in rows:
        pdf.cell(45, 6, label)
        pdf.cell(0, 6, value, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    widths = (86, 28, 24, 22, 30)
    headers = ("项目 Item", "数量 Quantity", "单价 Price", "折扣 Off", "金额 Amount")
    pdf.set_font(FONT, size=9)
    pdf.set_fill_color(235, 235, 235)
    for width, header in zip(widths, headers, strict=True):
        pdf.cell(width, 7, header, border=1, fill=True)
    pdf.ln()
    for line in lines:
        texts = (
            f"{line.description_zh}\n{line.description_en}",
            f"{line.billed_quantity:f} {line.unit}",
            f"{line.unit_price.normalize():f}",
            f"{line.discount_percent.normalize():f}%" if line.discount_percent else "",
            _money(line.amount),
        )
        x, y = pdf.get_x(), pdf.get_y()
        pdf.multi_cell(widths[0], 4.5, texts[0], border=1)
        height = pdf.get_y() - y
        pdf.set_xy(x + widths[0], y)
        for width, text in zip(widths[1:], texts[1:], strict=True):
            pdf.cell(width, height, text, border=1, align="R")
        pdf.ln(height)
    pdf.set_font(FONT, size=11)
    pdf.cell(sum(widths[:-1]), 8, "合计 Total", border=1, align="R")
    pdf.cell(widths[-1], 8, _money(invoice.total), border=1, align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT, size=9)
    pdf.ln(2)
    pdf.cell(0, 5, f"算力包抵扣 Paid from compute packages: {_money(paid.packages)}", new_x="LMARGIN", new_y="NEXT")
    pdf.cell(0, 5, f"余额支付 Paid from balance: {_money(paid.cash)}", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.multi_cell(
        0,
        4.5,
        "每行金额按四舍五入精确到分，合计等于各行之和。Each line is rounded half up to the fen once; "
        "the total is the sum of the lines.",
    )
    return bytes(pdf.output())
