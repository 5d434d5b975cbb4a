"""Thin REST views for task hosting: parse, call one service, serialise. Tasks are always the caller's tenant's."""

from django.http import FileResponse, StreamingHttpResponse
from django.utils.translation import gettext as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from hosting import selectors, services, storage
from hosting.api.serializers import (
    ResultFileSerializer,
    TaskCreateSerializer,
    TaskDetailSerializer,
    TaskEventPageSerializer,
    TaskSerializer,
)
from hosting.models import EventKind, Task, TaskState
from portal.api import ErrorSerializer
from tenants.api.views import TenantScopedMixin
from tenants.roles import Capability

BAD_REQUEST = OpenApiResponse(ErrorSerializer, description="Invalid input: each field lists its messages.")
UUID_PATTERN = "[0-9a-fA-F-]{36}"
EVENTS_PER_PAGE = 1000
AFTER = OpenApiParameter(
    "after", OpenApiTypes.INT, description="Only events with a larger sequence number (default 0)."
)


class PlainTextRenderer(BaseRenderer):
    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, dict):  # an error: {"detail": …}
            data = "\n".join(str(value) for value in data.values())
        return str(data).encode(self.charset)


def _state_filter(value: str | None) -> str | None:
    if not value:
        return None
    if value not in TaskState.values:
        raise ValidationError(
            {"state": [_("Unknown state. Use one of: %(states)s.") % {"states": ", ".join(TaskState.values)}]}
        )
    return value


def _after(request) -> int:
    value = request.query_params.get("after") or "0"
    try:
        after = int(value)
    except ValueError:
        after = -1
    if after < 0:
        raise ValidationError({"after": [_("Give a sequence number: a whole number, 0 or more.")]})
    return after


TASK_ACCEPTED = OpenApiResponse(TaskDetailSerializer, description="Accepted: the task's state follows.")


@extend_schema_view(
    list=extend_schema(
        summary="The tenant's tasks, newest first",
        parameters=[
            OpenApiParameter("state", OpenApiTypes.STR, enum=TaskState.values, description="Only tasks in this state.")
        ],
    ),
    retrieve=extend_schema(
        summary="One task: its state, place in line and estimated start, progress, latest metrics, runs and usage"
    ),
)
class TaskViewSet(TenantScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = TaskSerializer
    queryset = Task.objects.none()  # for the schema; requests use get_queryset()
    lookup_field = "pk"
    lookup_value_regex = UUID_PATTERN
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    read_capability = Capability.VIEW_COMPUTE
    write_capability = Capability.USE_COMPUTE

    def get_queryset(self):
        tasks = selectors.tasks_of(self.tenant)
        if self.action == "list":
            state = _state_filter(self.request.query_params.get("state"))
            if state:
                tasks = tasks.filter(state=state)
        return tasks

    def get_serializer_class(self):
        return TaskSerializer if self.action == "list" else TaskDetailSerializer

    def list(self, request):
        page = self.paginate_queryset(self.get_queryset())
        context = self.get_serializer_context() | {"queue_positions": selectors.queue_positions(page)}
        return self.get_paginated_response(TaskSerializer(page, many=True, context=context).data)

    def _task_response(self, task: Task, code=status.HTTP_202_ACCEPTED) -> Response:
        fresh = selectors.task_of(self.tenant, task.pk)
        return Response(TaskDetailSerializer(fresh, context=self.get_serializer_context()).data, status=code)

    @extend_schema(
        request={"application/json": TaskCreateSerializer, "multipart/form-data": TaskCreateSerializer},
        responses={201: TaskDetailSerializer, 400: BAD_REQUEST},
        summary="Submit a task: it waits in line until quota, credit and capacity allow, then runs",
    )
    def create(self, request):
        data = TaskCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        task = services.task_submit(membership=self.membership, actor=request.user, **data.validated_data)
        return self._task_response(task, status.HTTP_201_CREATED)

    @extend_schema(
        request=None,
        responses={202: TASK_ACCEPTED, 400: BAD_REQUEST},
        summary="Cancel: a waiting task at once; a running one gets SIGTERM, then SIGKILL after a grace period",
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        task = services.task_cancel(membership=self.membership, actor=request.user, task=self.get_object())
        return self._task_response(task)

    def _event_page(self, task: Task, kinds=None) -> Response:
        events = selectors.task_events(task, after=_after(self.request), kinds=kinds, limit=EVENTS_PER_PAGE + 1)
        page = events[:EVENTS_PER_PAGE]
        last_seq = max(task.last_seq, page[-1].seq if page else 0)
        return Response(
            TaskEventPageSerializer({"events": page, "last_seq": last_seq, "more": len(events) > EVENTS_PER_PAGE}).data
        )

    @extend_schema(
        parameters=[
            AFTER,
            OpenApiParameter(
                "format",
                OpenApiTypes.STR,
                enum=["txt", "json"],
                description="txt (default): the whole log as text. json: log events after `after`, in pages.",
            ),
        ],
        responses={
            (200, "text/plain"): OpenApiResponse(OpenApiTypes.STR, description="The whole log, line by line."),
            (200, "application/json"): TaskEventPageSerializer,
        },
        summary="The task's log: the whole of it as text, or its lines after a sequence number as JSON",
    )
    @action(detail=True, methods=["get"], renderer_classes=[PlainTextRenderer, JSONRenderer], pagination_class=None)
    def logs(self, request, pk=None):
        task = self.get_object()
        if request.accepted_renderer.format == "json":
            return self._event_page(task, kinds=[EventKind.LOG])
        return StreamingHttpResponse(selectors.full_log(task), content_type="text/plain; charset=utf-8")

    @extend_schema(
        parameters=[AFTER],
        responses=TaskEventPageSerializer,
        summary="The task's events after a sequence number (state, progress, metrics, log), for clients "
        "without WebSockets",
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def events(self, request, pk=None):
        return self._event_page(self.get_object())

    @extend_schema(responses=ResultFileSerializer(many=True), summary="Files the task left in its results")
    @action(detail=True, methods=["get"], pagination_class=None)
    def results(self, request, pk=None):
        task = self.get_object()
        context = self.get_serializer_context() | {"task": task}
        return Response(ResultFileSerializer(storage.result_files(task), many=True, context=context).data)


class TaskResultView(TenantScopedMixin, APIView):
    """One result file, as an attachment. Members who use compute only; any path outside the results is 404."""

    read_capability = Capability.USE_COMPUTE

    @extend_schema(
        responses={(200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="The file.")},
        summary="Download one result file",
    )
    def get(self, request, pk, path):
        try:
            task = selectors.task_of(self.tenant, pk)
            file = storage.open_result(task, path)
        except (Task.DoesNotExist, FileNotFoundError) as exc:
            raise NotFound from exc
        response = FileResponse(file.file, as_attachment=True, filename=file.name)
        response["Content-Length"] = file.size
        return response
