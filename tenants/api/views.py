"""Thin REST views: parse, call one service, serialise. Querysets are always the caller's tenant's."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api import ErrorSerializer
from tenants import selectors, services
from tenants.api.serializers import (
    ApiTokenCreatedSerializer,
    ApiTokenCreateSerializer,
    ApiTokenSerializer,
    InvitationCreateSerializer,
    InvitationSerializer,
    MembershipRoleSerializer,
    MembershipSerializer,
    SshKeyCreateSerializer,
    SshKeySerializer,
    TenantSerializer,
)
from tenants.models import ApiToken, Invitation, Membership, SshKey
from tenants.roles import Capability, role_can

BAD_REQUEST = OpenApiResponse(ErrorSerializer, description="Invalid input: each field lists its messages.")


class TenantScopedMixin:
    """Gives views the caller's membership and tenant, set by the token or the session."""

    @property
    def membership(self):
        return self.request._request.membership

    @property
    def tenant(self):
        return self.membership.tenant


class TenantView(TenantScopedMixin, APIView):
    read_capability = Capability.VIEW_TENANT
    write_capability = Capability.MANAGE_MEMBERS

    def _render(self, tenant):
        context = {"membership": self.membership, "quota_lines": selectors.quota_usage(tenant)}
        return Response(TenantSerializer(tenant, context=context).data)

    @extend_schema(responses=TenantSerializer, summary="The active tenant: tier, your role, quotas with current use")
    def get(self, request):
        return self._render(self.tenant)

    @extend_schema(
        request=TenantSerializer,
        responses={200: TenantSerializer, 400: BAD_REQUEST},
        summary="Rename the tenant (owner or admin)",
    )
    def patch(self, request):
        tenant = services.tenant_rename(membership=self.membership, actor=request.user, name=request.data.get("name"))
        return self._render(tenant)


@extend_schema_view(
    list=extend_schema(summary="Members of the tenant"),
    retrieve=extend_schema(summary="One member"),
    partial_update=extend_schema(
        request=MembershipRoleSerializer,
        responses={200: MembershipSerializer, 400: BAD_REQUEST},
        summary="Change a member's role (owner or admin; only owners touch owners)",
    ),
    destroy=extend_schema(summary="Remove a member (the last owner cannot be removed)"),
)
class MemberViewSet(TenantScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = MembershipSerializer
    queryset = Membership.objects.none()  # for the schema; requests use get_queryset()
    read_capability = Capability.VIEW_TENANT
    write_capability = Capability.MANAGE_MEMBERS

    def get_queryset(self):
        return selectors.members_of(self.tenant)

    @extend_schema(
        request=InvitationCreateSerializer,
        responses={201: InvitationSerializer, 400: BAD_REQUEST},
        summary="Invite someone by email with a role",
    )
    def create(self, request):
        data = InvitationCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        invitation, _key = services.invitation_create(
            membership=self.membership, actor=request.user, **data.validated_data
        )
        return Response(InvitationSerializer(invitation).data, status=status.HTTP_201_CREATED)

    def partial_update(self, request, pk=None):
        data = MembershipRoleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        target = services.membership_change_role(
            membership=self.membership, actor=request.user, target=self.get_object(), role=data.validated_data["role"]
        )
        return Response(MembershipSerializer(target).data)

    def destroy(self, request, pk=None):
        services.membership_remove(membership=self.membership, actor=request.user, target=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        request=None, responses={204: None, 400: BAD_REQUEST}, summary="Leave the tenant (the last owner cannot leave)"
    )
    @action(detail=False, methods=["post"], write_capability=Capability.VIEW_TENANT)
    def leave(self, request):
        services.membership_remove(membership=self.membership, actor=request.user, target=self.membership)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema_view(
    list=extend_schema(summary="Pending invitations"),
    retrieve=extend_schema(summary="One pending invitation"),
    destroy=extend_schema(summary="Withdraw a pending invitation"),
)
class InvitationViewSet(
    TenantScopedMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = InvitationSerializer
    queryset = Invitation.objects.none()
    read_capability = Capability.MANAGE_MEMBERS
    write_capability = Capability.MANAGE_MEMBERS

    def get_queryset(self):
        return selectors.pending_invitations_of(self.tenant)

    def perform_destroy(self, instance):
        services.invitation_revoke(membership=self.membership, actor=self.request.user, invitation=instance)


@extend_schema_view(
    list=extend_schema(summary="SSH public keys of the tenant"),
    retrieve=extend_schema(summary="One SSH key"),
    destroy=extend_schema(summary="Delete an SSH key (your own, or any as owner/admin)"),
)
class SshKeyViewSet(
    TenantScopedMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = SshKeySerializer
    queryset = SshKey.objects.none()
    read_capability = Capability.VIEW_COMPUTE
    write_capability = Capability.USE_COMPUTE

    def get_queryset(self):
        return selectors.ssh_keys_of(self.tenant)

    @extend_schema(
        request=SshKeyCreateSerializer,
        responses={201: SshKeySerializer, 400: BAD_REQUEST},
        summary="Add an SSH public key (ed25519, ECDSA, RSA ≥ 2048 bits)",
    )
    def create(self, request):
        data = SshKeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = services.ssh_key_add(membership=self.membership, actor=request.user, **data.validated_data)
        return Response(SshKeySerializer(key).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        services.ssh_key_delete(membership=self.membership, actor=self.request.user, key=instance)


@extend_schema_view(
    list=extend_schema(summary="API tokens: your own, or everyone's for owners and admins"),
    retrieve=extend_schema(summary="One API token (never its secret)"),
    destroy=extend_schema(summary="Revoke an API token"),
)
class ApiTokenViewSet(
    TenantScopedMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = ApiTokenSerializer
    queryset = ApiToken.objects.none()
    read_capability = Capability.VIEW_TENANT
    write_capability = Capability.VIEW_TENANT  # anyone may hold tokens; a token can do what its user's role can

    def get_queryset(self):
        sees_all = role_can(self.membership.role, Capability.MANAGE_KEYS)
        return selectors.api_tokens_of(self.tenant, user=None if sees_all else self.request.user)

    @extend_schema(
        request=ApiTokenCreateSerializer,
        responses={201: ApiTokenCreatedSerializer, 400: BAD_REQUEST},
        summary="Create an API token; the secret is in this response only",
    )
    def create(self, request):
        data = ApiTokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        issued = services.api_token_create(membership=self.membership, actor=request.user, **data.validated_data)
        body = ApiTokenSerializer(issued.token).data | {"token": issued.secret}
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        services.api_token_revoke(membership=self.membership, actor=self.request.user, token=instance)
