"""Cluster backends, chosen by settings.PORTAL_CLUSTER_BACKEND ("local" or "kubevirt")."""

from functools import lru_cache

from django.conf import settings
from django.utils.module_loading import import_string

from provisioning.backends.base import ClusterBackend

BACKENDS = {
    "local": "provisioning.backends.local.LocalBackend",
    "kubevirt": "provisioning.backends.kubevirt.KubevirtBackend",
}


@lru_cache(maxsize=4)
def _load(name: str) -> ClusterBackend:
    return import_string(BACKENDS[name])()


def get_backend() -> ClusterBackend:
    return _load(settings.PORTAL_CLUSTER_BACKEND)


def reset_backend_cache() -> None:
    _load.cache_clear()
