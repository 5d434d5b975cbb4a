"""Strict validation of the manifests the portal applies, before any cluster sees them.

- KubeVirt and CDI kinds (`*.kubevirt.io` API groups) against KubeVirt's OpenAPI document
  (settings.PORTAL_KUBEVIRT_SCHEMA, ../shared/kubevirt/swagger.json). That document never sets
  `additionalProperties: false`, so as loaded here every object schema that lists `properties` gets
  it: a misspelled field (`dedicatedCPUPlacement`) is an error instead of being silently dropped
  by the API server.
- Core kinds (Namespace, Service, NetworkPolicy, Role …) with `kubernetes-validate` in strict mode.
- For every kind, the names and label syntax that neither schema checks but the API server
  enforces (DNS-1123 names, label keys and values).

`metadata` is validated, not skipped: this swagger does carry ObjectMeta (the one it references from
every kind), so the strict schema covers its fields, and the syntax checks above cover its values.
"""

import json
import re
from functools import lru_cache
from pathlib import Path

import kubernetes_validate
from django.conf import settings
from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

_SCHEMA_URI = "urn:kubevirt:swagger"
_OBJECT_META = "#/definitions/k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# The KubeVirt document describes CDI's DataVolumeSpec (for dataVolumeTemplates) but not the
# DataVolume kind itself; this definition wraps the spec the same way DataVolumeTemplateSpec does.
_DATA_VOLUME = "cdi.kubevirt.io.v1beta1.DataVolume"
_POST_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/(?:namespaces/\{namespace\}/)?[^/{}]+$")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Kinds whose names must be DNS labels rather than subdomains.
_LABEL_NAMED_KINDS = {"Namespace", "VirtualMachine", "VirtualMachineInstance"}


class ManifestInvalid(Exception):
    """A manifest the API server would refuse. `errors` holds one line per problem."""

    def __init__(self, kind: str, name: str, errors: list[str]):
        self.kind = kind
        self.name = name
        self.errors = errors
        super().__init__(f"{kind} {name!r} is invalid: " + "; ".join(errors))


class SchemaUnavailable(RuntimeError):
    """A KubeVirt kind was to be validated but the KubeVirt schema file is missing."""


def schema_path() -> Path:
    return Path(settings.PORTAL_KUBEVIRT_SCHEMA)


def schema_available() -> bool:
    return schema_path().is_file()


def uses_kubevirt_schema(obj: dict) -> bool:
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return group == "kubevirt.io" or group.endswith(".kubevirt.io")


def validate_manifest(obj: dict) -> None:
    """Raise ManifestInvalid when the object would not pass the API server's schema checks."""
    kind = str(obj.get("kind", "")) or "?"
    name = str((obj.get("metadata") or {}).get("name", "")) or "?"
    errors = _kubevirt_errors(obj) if uses_kubevirt_schema(obj) else _core_errors(obj)
    errors += _metadata_errors(obj)
    if errors:
        raise ManifestInvalid(kind, name, errors)


def validate_manifests(objects: list[dict]) -> None:
    for obj in objects:
        validate_manifest(obj)


# --- KubeVirt -----------------------------------------------------------------------------------


def _kubevirt_errors(obj: dict) -> list[str]:
    path = schema_path()
    if not path.is_file():
        raise SchemaUnavailable(f"The KubeVirt schema {path} is missing (settings.PORTAL_KUBEVIRT_SCHEMA).")
    kinds = _kubevirt_schema(str(path))[1]
    definition = kinds.get((obj.get("apiVersion"), obj.get("kind")))
    if definition is None:
        return [f"{obj.get('apiVersion')} {obj.get('kind')} is not a kind the KubeVirt schema describes"]
    validator = _validator(str(path), definition)
    errors = sorted(validator.iter_errors(obj), key=lambda error: [str(part) for part in error.absolute_path])
    return [f"{_json_path(error.absolute_path)}: {_short(error.message)}" for error in errors]


@lru_cache(maxsize=2)
def _kubevirt_schema(path: str) -> tuple[dict, dict[tuple[str, str], str]]:
    """The swagger document made strict, and (apiVersion, kind) → definition name.

    Kinds come from the document's create (POST) operations, whose body names the definition."""
    document = json.loads(Path(path).read_text())
    for definition in document["definitions"].values():
        _forbid_unknown_properties(definition)
    kinds: dict[tuple[str, str], str] = {}
    for url, operations in document.get("paths", {}).items():
        match = _POST_PATH.match(url)
        post = operations.get("post") if isinstance(operations, dict) else None
        if not match or not post:
            continue
        for parameter in post.get("parameters", []):
            ref = parameter.get("schema", {}).get("$ref", "") if parameter.get("in") == "body" else ""
            if ref.startswith("#/definitions/"):
                name = ref.removeprefix("#/definitions/")
                api_version = f"{match['group']}/{match['version']}"
                kinds[(api_version, name.split(".", 1)[1])] = name
    if "v1beta1.DataVolumeSpec" in document["definitions"]:
        document["definitions"][_DATA_VOLUME] = {
            "type": "object",
            "required": ["spec"],
            "additionalProperties": False,
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"$ref": _OBJECT_META},
                "spec": {"$ref": "#/definitions/v1beta1.DataVolumeSpec"},
                "status": {"type": "object"},
            },
        }
        kinds[("cdi.kubevirt.io/v1beta1", "DataVolume")] = _DATA_VOLUME
    return document, kinds


def _forbid_unknown_properties(schema) -> None:
    """Add `additionalProperties: false` to every object schema with `properties`, nested ones too.

    Schemas without `properties` (RawExtension, FieldsV1, marker types such as `masquerade: {}`)
    stay open: they are free-form by design."""
    if not isinstance(schema, dict):
        return
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for child in schema.get("properties", {}).values():
        _forbid_unknown_properties(child)
    for key in ("items", "additionalProperties"):
        _forbid_unknown_properties(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for child in schema.get(key, []):
            _forbid_unknown_properties(child)


@lru_cache(maxsize=32)
def _validator(path: str, definition: str) -> Draft4Validator:
    # Swagger 2.0 schemas are JSON Schema draft 4; refs are "#/definitions/…" within the document.
    document = _kubevirt_schema(path)[0]
    registry = Registry().with_resource(_SCHEMA_URI, Resource(contents=document, specification=DRAFT4))
    return Draft4Validator({"$ref": f"{_SCHEMA_URI}#/definitions/{definition}"}, registry=registry)


# --- Core ---------------------------------------------------------------------------------------


def _core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, desired_version=kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:
        # kubernetes-validate reports the first problem only.
        return [f"{_json_path(error.path)}: {_short(error.message)}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"Kubernetes {kubernetes_validate.latest_version()} has no kind {obj.get('apiVersion')} {obj.get('kind')}"
        ]
    return []


# --- Names and labels ---------------------------------------------------------------------------


def _metadata_errors(obj: dict) -> list[str]:
    errors: list[str] = []
    kind = obj.get("kind")
    metadata = obj.get("metadata") or {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        errors.append("metadata.name: a name is required")
    elif kind == "Service":
        if len(name) > 63 or not _DNS1035_LABEL.match(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1035 label (a-z first, then a-z 0-9 -, ≤ 63)")
    elif kind in _LABEL_NAMED_KINDS:
        if len(name) > 63 or not _DNS1123_LABEL.match(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1123 label (a-z 0-9 -, ≤ 63)")
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    namespace = metadata.get("namespace")
    if namespace is not None and (len(str(namespace)) > 63 or not _DNS1123_LABEL.match(str(namespace))):
        errors.append(f"metadata.namespace: {namespace!r} is not a DNS-1123 label")
    label_maps = list(_label_maps(obj, ""))
    if kind == "Service" and isinstance((obj.get("spec") or {}).get("selector"), dict):
        label_maps.append(("spec.selector", obj["spec"]["selector"]))
    for where, mapping in label_maps:
        errors += _label_errors(where, mapping)
    return errors


def _label_maps(node, where: str):
    """Every label map in the object: metadata labels at any depth, matchLabels and node selectors."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{where}.{key}" if where else key
            if isinstance(value, dict) and (
                key in ("matchLabels", "nodeSelector") or (key == "labels" and where.endswith("metadata"))
            ):
                yield child, value
            yield from _label_maps(value, child)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _label_maps(item, f"{where}[{index}]")


def _label_errors(where: str, mapping: dict) -> list[str]:
    errors = []
    for key, value in mapping.items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix))) or (
            len(name) > 63 or not _LABEL_NAME.match(name)
        ):
            errors.append(f"{where}: {key!r} is not a valid label key")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(f"{where}.{key}: {value!r} is not a valid label value")
    return errors


def _json_path(parts) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(object)"


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"
