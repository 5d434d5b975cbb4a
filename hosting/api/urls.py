from django.urls import path
from rest_framework.routers import SimpleRouter

from hosting.api import views

router = SimpleRouter()
router.register("tasks", views.TaskViewSet, basename="task")

urlpatterns = [
    *router.urls,
    path("tasks/<uuid:pk>/results/<path:path>", views.TaskResultView.as_view(), name="api-task-result"),
]
