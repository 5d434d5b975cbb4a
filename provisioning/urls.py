from django.urls import path

from provisioning import views

urlpatterns = [
    path("compute/", views.compute_home, name="compute"),
    path("compute/order/", views.vm_order, name="vm_order"),
    path("compute/vms/<uuid:pk>/", views.vm_detail, name="vm_detail"),
    path("compute/vms/<uuid:pk>/status/", views.vm_status_partial, name="vm_status_partial"),
    path("compute/vms/<uuid:pk>/access/", views.vm_access, name="vm_access"),
    path("compute/vms/<uuid:pk>/scale-up/", views.vm_scale_up, name="vm_scale_up"),
    path("compute/vms/<uuid:pk>/<slug:action>/", views.vm_action, name="vm_action"),
]
