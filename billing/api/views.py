"""Thin REST views for billing: parse, call one service or selector, serialise. Always the caller's tenant."""

from decimal import Decimal

from django.http import Http404
from django.utils.dateparse import parse_date
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from billing import selectors, services
from billing.api.renderers import CsvRenderer, PdfRenderer
from billing.api.serializers import (
    InvoiceDetailSerializer,
    InvoiceSerializer,
    LedgerEntrySerializer,
    PackageOfferSerializer,
    PaymentSerializer,
    PriceBookSerializer,
    PurchaseSerializer,
    StatementQuerySerializer,
    StatementRowSerializer,
    StatementSerializer,
    SubscriptionSerializer,
    TopUpSerializer,
    UsageRecordSerializer,
    WalletSerializer,
    WalletUpdateSerializer,
)
from billing.hashing import canonical_json, format_quantity, format_time
from billing.models import Invoice, LedgerEntry, PackageOffer, Payment, Subscription
from billing.money import local_midnight, zone
from billing.pdf import invoice_pdf_bytes
from portal.api import ErrorSerializer
from provisioning.selectors import plans_with_availability
from tenants.api.views import TenantScopedMixin
from tenants.roles import Capability

BAD_REQUEST = OpenApiResponse(ErrorSerializer, description="Invalid input: each field lists its messages.")
CSV_FORMAT = OpenApiParameter(
    "format", OpenApiTypes.STR, enum=["json", "csv"], description="csv for a CSV download instead of JSON."
)


class PriceBookView(APIView):
    read_capability = Capability.VIEW_TENANT

    @extend_schema(
        responses=PriceBookSerializer,
        summary="Prices in force: task hosting, bands, packages, scale-ups, storage, VM plans",
    )
    def get(self, request):
        version = selectors.price_book_in_force()
        if version is None:
            raise Http404
        plans = [
            {"plan": plan.code, "name": plan.name, "monthly": p.monthly, "yearly": p.yearly, "hourly": p.hourly}
            for plan, p, _available in plans_with_availability()
            if p is not None
        ]
        data = {
            "effective_from": version.effective_from,
            "items": version.items.all(),
            "bands": version.bands.all(),
            "packages": version.packages.all(),
            "plans": plans,
        }
        return Response(PriceBookSerializer(data, context={"request": request}).data)


@extend_schema_view(
    list=extend_schema(summary="Compute packages on sale (prepaid task-hosting credit with a bonus)"),
    retrieve=extend_schema(summary="One package"),
)
class PackageViewSet(TenantScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = PackageOfferSerializer
    queryset = PackageOffer.objects.none()
    pagination_class = None
    read_capability = Capability.VIEW_TENANT
    write_capability = Capability.MANAGE_BILLING

    def get_queryset(self):
        version = selectors.price_book_in_force()
        return version.packages.all() if version else PackageOffer.objects.none()

    @extend_schema(
        request=PurchaseSerializer,
        responses={201: PaymentSerializer, 400: BAD_REQUEST},
        summary="Buy a package: a payment to make (bank transfer details or a checkout URL); credit arrives when paid",
    )
    @action(detail=True, methods=["post"])
    def purchase(self, request, pk=None):
        data = PurchaseSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        payment = services.package_purchase(
            membership=self.membership,
            actor=request.user,
            offer=self.get_object(),
            validity_months=data.validated_data.get("validity_months"),
        )
        return Response(PaymentSerializer(payment).data, status=status.HTTP_201_CREATED)


def _wallet_data(tenant) -> dict:
    summary = selectors.wallet_summary(tenant)
    return WalletSerializer(summary).data


class WalletView(TenantScopedMixin, APIView):
    read_capability = Capability.VIEW_BILLING
    write_capability = Capability.MANAGE_BILLING

    @extend_schema(responses=WalletSerializer, summary="Balance, package credit, reserved amount, burn-down forecast")
    def get(self, request):
        return Response(_wallet_data(self.tenant))

    @extend_schema(
        request=WalletUpdateSerializer,
        responses={200: WalletSerializer, 400: BAD_REQUEST},
        summary="Set the low-balance warning threshold",
    )
    def patch(self, request):
        data = WalletUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.wallet_set_low_balance_threshold(
            membership=self.membership, actor=request.user, threshold=data.validated_data["low_balance_threshold"]
        )
        return Response(_wallet_data(self.tenant))

    @extend_schema(
        request=WalletUpdateSerializer,
        responses={200: WalletSerializer, 400: BAD_REQUEST},
        summary="Set the low-balance warning threshold",
    )
    def post(self, request):
        return self.patch(request)


class TopUpView(TenantScopedMixin, APIView):
    read_capability = Capability.MANAGE_BILLING
    write_capability = Capability.MANAGE_BILLING

    @extend_schema(
        request=TopUpSerializer,
        responses={201: PaymentSerializer, 400: BAD_REQUEST},
        summary="Add cash to the wallet: a payment to make; the balance grows when it is paid",
    )
    def post(self, request):
        data = TopUpSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        payment = services.top_up_create(membership=self.membership, actor=request.user, **data.validated_data)
        return Response(PaymentSerializer(payment).data, status=status.HTTP_201_CREATED)


@extend_schema_view(
    list=extend_schema(summary="Your payments: packages and top-ups"),
    retrieve=extend_schema(summary="One payment, with where or how to pay"),
)
class PaymentViewSet(TenantScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = PaymentSerializer
    queryset = Payment.objects.none()
    read_capability = Capability.VIEW_BILLING
    write_capability = Capability.MANAGE_BILLING
    lookup_value_regex = "[0-9a-fA-F-]{36}"

    def get_queryset(self):
        return selectors.payments_of(self.tenant)

    @extend_schema(
        request=None, responses={200: PaymentSerializer, 400: BAD_REQUEST}, summary="Cancel a payment still waiting"
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        payment = services.payment_cancel(payment=self.get_object(), actor=request.user, membership=self.membership)
        return Response(PaymentSerializer(payment).data)


@extend_schema_view(
    list=extend_schema(summary="Ledger: every movement of your money, newest first"),
)
class LedgerViewSet(TenantScopedMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = LedgerEntrySerializer
    queryset = LedgerEntry.objects.none()
    read_capability = Capability.VIEW_BILLING

    def get_queryset(self):
        return selectors.ledger_of(self.tenant)


@extend_schema_view(
    list=extend_schema(summary="Monthly invoices, newest first"),
    retrieve=extend_schema(
        summary="One invoice with its lines (?format=pdf for the PDF)", responses=InvoiceDetailSerializer
    ),
)
class InvoiceViewSet(TenantScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = InvoiceSerializer
    queryset = Invoice.objects.none()
    read_capability = Capability.VIEW_BILLING
    renderer_classes = [JSONRenderer, PdfRenderer]

    def get_queryset(self):
        return selectors.invoices_of(self.tenant)

    def retrieve(self, request, pk=None):
        invoice = self.get_object()
        if request.accepted_renderer.format == "pdf":
            response = Response(invoice_pdf_bytes(invoice), content_type="application/pdf")
            response["Content-Disposition"] = f'inline; filename="{invoice.number or "draft"}.pdf"'
            return response
        paid = selectors.invoice_payments(invoice)
        invoice.paid_from_packages = paid.packages
        invoice.paid_from_balance = paid.cash
        return Response(InvoiceDetailSerializer(invoice).data)


@extend_schema_view(
    list=extend_schema(summary="VM subscriptions (monthly and yearly VMs)"),
    retrieve=extend_schema(summary="One subscription"),
)
class SubscriptionViewSet(TenantScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SubscriptionSerializer
    queryset = Subscription.objects.none()
    read_capability = Capability.VIEW_BILLING
    write_capability = Capability.MANAGE_BILLING

    def get_queryset(self):
        return selectors.subscriptions_of(self.tenant)

    def _cancel(self, cancel: bool) -> Response:
        subscription = services.subscription_cancel(
            membership=self.membership, actor=self.request.user, subscription=self.get_object(), cancel=cancel
        )
        return Response(SubscriptionSerializer(subscription).data)

    @extend_schema(
        request=None,
        responses={200: SubscriptionSerializer, 400: BAD_REQUEST},
        summary="Cancel at period end: the VM runs until the paid period ends, then is released",
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return self._cancel(True)

    @extend_schema(
        request=None, responses={200: SubscriptionSerializer, 400: BAD_REQUEST}, summary="Take a cancellation back"
    )
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        return self._cancel(False)


STATEMENT_COLUMNS = [
    "period_start",
    "period_end",
    "invoice_id",
    "invoice_month",
    "kind",
    "resource",
    "description",
    "unit",
    "unit_price",
    "discount_percent",
    "metered_unit",
    "quantity",
    "billed_quantity",
    "amount_unrounded",
    "amount",
]


class UsageStatementView(TenantScopedMixin, APIView):
    read_capability = Capability.VIEW_BILLING
    renderer_classes = [JSONRenderer, CsvRenderer]

    @extend_schema(
        parameters=[
            OpenApiParameter("from", OpenApiTypes.DATE, required=True, description="First day (inclusive)."),
            OpenApiParameter("to", OpenApiTypes.DATE, required=True, description="Last day (exclusive)."),
            OpenApiParameter(
                "granularity", OpenApiTypes.STR, enum=["day", "week", "month"], description="Period size."
            ),
            CSV_FORMAT,
        ],
        responses={200: StatementSerializer, 400: BAD_REQUEST},
        summary="Statement: charges by day, week or month; reconciles to the fen with invoices and the ledger",
    )
    def get(self, request):
        params = request.query_params
        query = StatementQuerySerializer(
            data={
                "start": params.get("from"),
                "end": params.get("to"),
                "granularity": params.get("granularity") or "day",
            }
        )
        if not query.is_valid():
            errors = query.errors
            renamed = {"from" if k == "start" else "to" if k == "end" else k: v for k, v in errors.items()}
            raise ValidationError(renamed)
        q = query.validated_data
        rows = selectors.statement(self.tenant, start=q["start"], end=q["end"], granularity=q["granularity"])
        if request.accepted_renderer.format == "csv":
            serialized = StatementRowSerializer(rows, many=True).data
            response = Response(
                {
                    "csv_columns": STATEMENT_COLUMNS,
                    "csv_rows": [[row[c] for c in STATEMENT_COLUMNS] for row in serialized],
                }
            )
            response["Content-Disposition"] = f'attachment; filename="statement-{q["start"]}-{q["end"]}.csv"'
            return response
        total = sum((row.amount for row in rows), Decimal("0.00"))
        body = {"start": q["start"], "end": q["end"], "granularity": q["granularity"], "total": total, "rows": rows}
        return Response(StatementSerializer(body).data)


RECORD_COLUMNS = list(UsageRecordSerializer.Meta.fields)


def _day_param(value: str | None, name: str):
    if not value:
        return None
    day = parse_date(value)
    if day is None:
        raise ValidationError({name: ["Use a date as YYYY-MM-DD."]})
    return day


class UsageRecordsView(TenantScopedMixin, APIView):
    read_capability = Capability.VIEW_BILLING
    renderer_classes = [JSONRenderer, CsvRenderer]

    @extend_schema(
        parameters=[
            OpenApiParameter("from", OpenApiTypes.DATE, description="Records appended on or after this day."),
            OpenApiParameter("to", OpenApiTypes.DATE, description="Records appended before this day."),
            CSV_FORMAT,
        ],
        responses={200: UsageRecordSerializer(many=True)},
        summary="Your usage log with sequence numbers and hashes, to verify the chain yourself (see docs)",
    )
    def get(self, request):
        tz = zone(self.tenant.time_zone)
        start = _day_param(request.query_params.get("from"), "from")
        end = _day_param(request.query_params.get("to"), "to")
        records = selectors.usage_records_of(
            self.tenant,
            start=local_midnight(start, tz) if start else None,
            end=local_midnight(end, tz) if end else None,
        )
        if request.accepted_renderer.format == "csv":
            rows = [
                [
                    r.tenant_id,
                    r.sequence,
                    r.idempotency_key,
                    r.source,
                    r.source_id,
                    r.resource,
                    r.unit,
                    format_quantity(r.quantity),
                    format_time(r.period_start),
                    format_time(r.period_end),
                    canonical_json(r.meta or {}),
                    format_time(r.created_at),
                    r.prev_hash,
                    r.hash,
                ]
                for r in records.iterator(chunk_size=2000)
            ]
            response = Response({"csv_columns": RECORD_COLUMNS, "csv_rows": rows})
            response["Content-Disposition"] = 'attachment; filename="usage-records.csv"'
            return response
        paginator = self.paginator
        page = paginator.paginate_queryset(records, request, view=self)
        return paginator.get_paginated_response(UsageRecordSerializer(page, many=True).data)

    @property
    def paginator(self):
        if not hasattr(self, "_paginator"):
            from portal.api import Pagination

            self._paginator = Pagination()
        return self._paginator
