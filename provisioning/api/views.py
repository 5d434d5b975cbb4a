"""Thin REST views for GPU VM rental: parse, call one service, serialise. VMs are always the caller's tenant's."""

from django.utils.translation import gettext as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from portal.api import ErrorSerializer
from provisioning import selectors, services
from provisioning.api.serializers import (
    GpuModelSerializer,
    PlanSerializer,
    ScaleUpCreateSerializer,
    ScaleUpSerializer,
    VmAccessSerializer,
    VmOrderSerializer,
    VmSerializer,
)
from provisioning.models import GpuModel, Plan, VirtualMachine, VmState
from tenants.api.views import TenantScopedMixin
from tenants.roles import Capability

BAD_REQUEST = OpenApiResponse(ErrorSerializer, description="Invalid input: each field lists its messages.")
UUID_PATTERN = "[0-9a-fA-F-]{36}"


@extend_schema_view(
    list=extend_schema(summary="GPU VM plans on offer, with current prices and live availability"),
    retrieve=extend_schema(summary="One plan"),
)
class PlanViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = PlanSerializer
    queryset = Plan.objects.none()  # for the schema; requests use get_queryset()
    lookup_field = "code"
    read_capability = Capability.VIEW_TENANT

    def get_queryset(self):
        return selectors.active_plans()

    def list(self, request):
        plans = self.paginate_queryset(self.get_queryset())
        context = self.get_serializer_context() | {"availability": selectors.plan_availability(plans)}
        return self.get_paginated_response(PlanSerializer(plans, many=True, context=context).data)


@extend_schema_view(
    list=extend_schema(summary="GPU models the cluster offers"),
    retrieve=extend_schema(summary="One GPU model"),
)
class GpuModelViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = GpuModelSerializer
    queryset = GpuModel.objects.all()
    lookup_field = "code"
    read_capability = Capability.VIEW_TENANT


def _state_filter(value: str | None) -> str | None:
    if not value:
        return None
    if value not in VmState.values:
        raise ValidationError(
            {"state": [_("Unknown state. Use one of: %(states)s.") % {"states": ", ".join(VmState.values)}]}
        )
    return value


VM_ACCEPTED = OpenApiResponse(VmSerializer, description="Accepted: the VM's state follows on the cluster.")


@extend_schema_view(
    list=extend_schema(
        summary="The tenant's VMs (released ones only with include_released=1)",
        parameters=[
            OpenApiParameter("state", OpenApiTypes.STR, enum=VmState.values, description="Only VMs in this state."),
            OpenApiParameter(
                "include_released", OpenApiTypes.BOOL, description="1 to list released VMs too (hidden by default)."
            ),
        ],
    ),
    retrieve=extend_schema(summary="One VM (never its Jupyter token)"),
)
class VmViewSet(TenantScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = VmSerializer
    queryset = VirtualMachine.objects.none()
    lookup_field = "pk"
    lookup_value_regex = UUID_PATTERN
    read_capability = Capability.VIEW_COMPUTE
    write_capability = Capability.USE_COMPUTE

    def get_queryset(self):
        vms = selectors.vms_of(self.tenant)
        if self.action != "list":
            return vms
        state = _state_filter(self.request.query_params.get("state"))
        if state:
            return vms.filter(state=state)
        if self.request.query_params.get("include_released") not in ("1", "true", "True"):
            vms = vms.exclude(state=VmState.RELEASED)
        return vms

    def list(self, request):
        page = self.paginate_queryset(self.get_queryset())
        context = self.get_serializer_context() | {"queue_positions": selectors.queue_positions(page)}
        return self.get_paginated_response(VmSerializer(page, many=True, context=context).data)

    def _vm_response(self, vm: VirtualMachine, code=status.HTTP_202_ACCEPTED) -> Response:
        fresh = selectors.vm_of(self.tenant, vm.pk)  # with its plan and scale-ups, as list and retrieve show it
        return Response(VmSerializer(fresh, context=self.get_serializer_context()).data, status=code)

    @extend_schema(
        request=VmOrderSerializer,
        responses={201: VmSerializer, 400: BAD_REQUEST},
        summary="Order a VM: checks role, quota and capacity; with wait_if_full it waits in line for a GPU",
    )
    def create(self, request):
        data = VmOrderSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        vm = services.vm_order(membership=self.membership, actor=request.user, **data.validated_data)
        return self._vm_response(vm, status.HTTP_201_CREATED)

    def _act(self, service) -> Response:
        vm = service(membership=self.membership, actor=self.request.user, vm=self.get_object())
        return self._vm_response(vm)

    @extend_schema(request=None, responses={202: VM_ACCEPTED, 400: BAD_REQUEST}, summary="Start a stopped VM")
    @action(detail=True, methods=["post"])
    def start(self, request, pk=None):
        return self._act(services.vm_start)

    @extend_schema(
        request=None, responses={202: VM_ACCEPTED, 400: BAD_REQUEST}, summary="Stop a VM (billing pauses once stopped)"
    )
    @action(detail=True, methods=["post"])
    def stop(self, request, pk=None):
        return self._act(services.vm_stop)

    @extend_schema(request=None, responses={202: VM_ACCEPTED, 400: BAD_REQUEST}, summary="Restart a running VM")
    @action(detail=True, methods=["post"])
    def restart(self, request, pk=None):
        return self._act(services.vm_restart)

    @extend_schema(
        request=None,
        responses={202: VM_ACCEPTED, 400: BAD_REQUEST},
        summary="Release the VM: it is deleted with its disks and stops costing money. Irreversible",
    )
    @action(detail=True, methods=["post"])
    def release(self, request, pk=None):
        return self._act(services.vm_release)

    @extend_schema(
        request=None,
        responses={200: VmAccessSerializer, 400: BAD_REQUEST},
        summary="SSH command and Jupyter link with its token (members who use compute; audited)",
    )
    @action(detail=True, methods=["post"])
    def access(self, request, pk=None):
        access = services.vm_reveal_access(membership=self.membership, actor=request.user, vm=self.get_object())
        response = Response(VmAccessSerializer(access).data)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(
        request=None,
        responses={202: VM_ACCEPTED, 400: BAD_REQUEST},
        summary="New Jupyter token; a running VM restarts to take it",
    )
    @action(detail=True, methods=["post"], url_path="rotate-jupyter-token")
    def rotate_jupyter_token(self, request, pk=None):
        return self._act(services.vm_rotate_jupyter_token)

    @extend_schema(methods=["get"], request=None, responses=ScaleUpSerializer(many=True), summary="The VM's scale-ups")
    @extend_schema(
        methods=["post"],
        request=ScaleUpCreateSerializer,
        responses={201: ScaleUpSerializer, 400: BAD_REQUEST},
        summary="Add GPUs, vCPUs or memory for N days (monthly and yearly VMs; the VM restarts)",
    )
    @action(detail=True, methods=["get", "post"], url_path="scale-ups", pagination_class=None)
    def scale_ups(self, request, pk=None):
        vm = self.get_object()
        if request.method == "GET":
            return Response(ScaleUpSerializer(selectors.scale_ups_of(vm), many=True).data)
        data = ScaleUpCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        scale_up = services.scale_up_add(membership=self.membership, actor=request.user, vm=vm, **data.validated_data)
        return Response(ScaleUpSerializer(scale_up).data, status=status.HTTP_201_CREATED)
