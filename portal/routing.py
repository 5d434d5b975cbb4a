from django.urls import path

from portal.consumers import DashboardConsumer, TaskConsumer

websocket_urlpatterns = [
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
    path("ws/tasks/<uuid:task_id>/", TaskConsumer.as_asgi()),
]
