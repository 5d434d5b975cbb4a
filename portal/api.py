"""Shared pieces of the REST API."""

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.views import exception_handler as drf_exception_handler


def as_drf_validation_error(exc: DjangoValidationError) -> ValidationError:
    if hasattr(exc, "error_dict"):
        return ValidationError(
            {field: [str(m) for e in errors for m in e.messages] for field, errors in exc.error_dict.items()}
        )
    return ValidationError({"non_field_errors": [str(m) for m in exc.messages]})


def exception_handler(exc, context):
    """Business-rule refusals from services (Django ValidationError) become 400s with field messages."""
    if isinstance(exc, DjangoValidationError):
        exc = as_drf_validation_error(exc)
    return drf_exception_handler(exc, context)


class ErrorSerializer(serializers.Serializer):
    """Shape of a 400: each field maps to its messages; `non_field_errors` holds the rest."""

    non_field_errors = serializers.ListField(
        child=serializers.CharField(), required=False, help_text="Messages that concern no single field."
    )


class Pagination(LimitOffsetPagination):
    """?limit=&offset= pages, every field of the envelope described in the schema."""

    def get_paginated_response_schema(self, schema):
        envelope = super().get_paginated_response_schema(schema)
        descriptions = {
            "count": "Number of objects in all pages.",
            "next": "URL of the next page, or null on the last.",
            "previous": "URL of the previous page, or null on the first.",
            "results": "The objects of this page.",
        }
        for name, text in descriptions.items():
            envelope["properties"][name]["description"] = text
        return envelope
