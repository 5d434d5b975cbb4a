from django.urls import path

from hosting import views

urlpatterns = [
    path("tasks/", views.task_list, name="tasks"),
    path("tasks/new/", views.task_new, name="task_new"),
    path("tasks/<uuid:pk>/", views.task_detail, name="task_detail"),
    path("tasks/<uuid:pk>/cancel/", views.task_cancel, name="task_cancel"),
    path("tasks/<uuid:pk>/log/", views.task_log, name="task_log"),
    path("tasks/<uuid:pk>/results/<path:path>", views.task_result, name="task_result"),
]
