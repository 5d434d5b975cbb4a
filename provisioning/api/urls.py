from rest_framework.routers import SimpleRouter

from provisioning.api import views

router = SimpleRouter()
router.register("plans", views.PlanViewSet, basename="plan")
router.register("gpu-models", views.GpuModelViewSet, basename="gpu-model")
router.register("vms", views.VmViewSet, basename="vm")

urlpatterns = router.urls
