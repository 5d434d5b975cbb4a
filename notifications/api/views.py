"""Thin REST views for the caller's own notifications."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors, services
from notifications.api.serializers import (
    NotificationReadResultSerializer,
    NotificationReadSerializer,
    NotificationSerializer,
)
from notifications.models import Notification
from portal.api import ErrorSerializer
from tenants.models import ApiToken


def _token_tenant(request):
    """An API token is fixed to one tenant: it sees that tenant's notifications and the personal ones.
    The browser session sees all of its user's."""
    return request.auth.tenant if isinstance(request.auth, ApiToken) else None


class NotificationListView(generics.ListAPIView):
    serializer_class = NotificationSerializer
    permission_classes = [IsAuthenticated]  # a user's own inbox: no tenant role needed
    queryset = Notification.objects.none()  # for the schema; requests use get_queryset()

    def get_queryset(self):
        unread = self.request.query_params.get("unread", "").lower() in ("1", "true", "yes")
        return selectors.notifications_of(self.request.user, tenant=_token_tenant(self.request), unread_only=unread)

    @extend_schema(
        summary="Your notifications, newest first",
        parameters=[OpenApiParameter("unread", OpenApiTypes.BOOL, description="true for unread ones only.")],
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class NotificationReadView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        request=NotificationReadSerializer,
        responses={
            200: NotificationReadResultSerializer,
            400: OpenApiResponse(ErrorSerializer, description="Neither ids nor all was given."),
        },
        summary="Mark notifications read",
    )
    def post(self, request):
        serializer = NotificationReadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        tenant = _token_tenant(request)
        visible = selectors.notifications_of(request.user, tenant=tenant, unread_only=True)
        if not serializer.validated_data.get("all"):
            visible = visible.filter(pk__in=serializer.validated_data["ids"])
        marked = services.mark_read(user=request.user, ids=list(visible.values_list("pk", flat=True)))
        data = {"marked": marked, "unread": selectors.unread_count(request.user, tenant=tenant)}
        return Response(NotificationReadResultSerializer(data).data)
