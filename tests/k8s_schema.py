"""Validate a Kubernetes object against a CRD's openAPIV3Schema, as the API server would on create.

The schema is the CRD's own, run by ``jsonschema`` with Kubernetes' extensions made real:

* structural pruning/strict field validation: an object schema with ``properties`` (and no
  ``x-kubernetes-preserve-unknown-fields``) allows no other field, so a misspelt field fails;
* ``format: int32/int64``: the integer ranges;
* ``x-kubernetes-list-type: set`` (unique items) and ``map`` (unique ``x-kubernetes-list-map-keys``,
  defaults applied);
* ``x-kubernetes-validations`` (CEL): transition rules (``oldSelf``) apply on update only and
  are skipped; every other rule met on the object must be in :data:`CEL_RULES`, translated by
  hand, or validation fails naming it (so a new upstream rule is never silently ignored);
* the root: ``apiVersion``/``kind`` fixed to the CRD's group/version and kind, and ``metadata``
  checked as ObjectMeta (DNS-1123 name, label keys/values, string annotations, namespace only for
  namespaced kinds), which the CRD leaves to the API server.
``x-kubernetes-int-or-string`` needs nothing: its ``anyOf`` is in the schema already.
"""
from __future__ import annotations

import copy
import re

import jsonschema
import yaml

INT_RANGE = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


def _has(obj, key):
    return isinstance(obj, dict) and key in obj


# CEL rules (exact text from the CRDs) -> Python, for the non-transition rules our objects reach.
CEL_RULES = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda s: re.search(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", s["metadata"]["name"]) is not None,
    "size(self.metadata.name) <= 63": lambda s: len(s["metadata"]["name"]) <= 63,
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)].filter(x, x).size() <= 1":
        lambda s: sum(_has(s, k) for k in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1,
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))":
        lambda s: not (_has(s, "startupPolicy") and s["startupPolicy"].get("startupPolicyOrder") == "InOrder"
                       and any(_has(x, "dependsOn") for x in s.get("replicatedJobs", []))),
}


def object_meta(namespaced: bool) -> dict:
    """ObjectMeta as the API server checks the fields a manifest sets."""
    props = {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "labels": {"type": "object", "propertyNames": {"pattern": QUALIFIED_NAME},
                   "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE}},
        "annotations": {"type": "object", "propertyNames": {"pattern": QUALIFIED_NAME},
                        "additionalProperties": {"type": "string"}},
    }
    if namespaced:
        props["namespace"] = {"type": "string", "maxLength": 63, "pattern": DNS1123_SUBDOMAIN}
    return {"type": "object", "required": ["name"], "properties": props, "additionalProperties": False}


def _structural(node):
    """The CRD schema with pruning and integer formats made explicit (a deep copy)."""
    if isinstance(node, list):
        return [_structural(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_structural(v) if k != "properties" else {p: _structural(s) for p, s in v.items()})
           for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("type") == "integer" and out.get("format") in INT_RANGE:
        lo, hi = INT_RANGE[out["format"]]
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    return out


def _list_type(validator, kind, instance, schema):
    if not isinstance(instance, list):
        return
    if kind == "set":
        seen = [yaml.safe_dump(x, sort_keys=True) for x in instance]
        if len(set(seen)) != len(seen):
            yield jsonschema.ValidationError(f"x-kubernetes-list-type set: duplicate items in {instance!r}")
    elif kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        tuples = [tuple(x.get(k, props.get(k, {}).get("default")) for k in keys) for x in instance]
        if len(set(tuples)) != len(tuples):
            yield jsonschema.ValidationError(f"x-kubernetes-list-type map: duplicate keys {keys} in {tuples}")


def _cel(validator, rules, instance, schema):
    for r in rules:
        rule = " ".join(r["rule"].split())
        if "oldSelf" in rule:
            continue  # a transition rule: checked on update only
        fn = CEL_RULES.get(rule)
        if fn is None:
            yield jsonschema.ValidationError(f"CEL rule not translated in tests/k8s_schema.py: {rule}")
        elif not fn(instance):
            yield jsonschema.ValidationError(f"x-kubernetes-validations: {r.get('message', rule)}")


K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel})


class CRD:
    """One CRD file: ``errors(obj)`` lists what the API server would reject on create."""

    def __init__(self, path: str):
        with open(path) as f:
            self.crd = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition")
        spec = self.crd["spec"]
        version = next(v for v in spec["versions"] if v.get("served") and v.get("storage"))
        self.api_version = f"{spec['group']}/{version['name']}"
        self.kind = spec["names"]["kind"]
        schema = _structural(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        schema["properties"]["apiVersion"] = {"type": "string", "const": self.api_version}
        schema["properties"]["kind"] = {"type": "string", "const": self.kind}
        schema["properties"]["metadata"] = object_meta(spec["scope"] == "Namespaced")
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
        self.schema = schema
        self.validator = K8sValidator(schema)

    def errors(self, obj) -> list:
        """'path: message' for each violation (empty: valid)."""
        return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(self.validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
