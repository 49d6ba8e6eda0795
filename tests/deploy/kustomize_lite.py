"""A small, strict kustomize for the fields deploy/k8s uses, for machines whose kubectl is missing
or embeds a kustomize older than v4 (Debian 12's kubectl 1.20 embeds v2.0.3, which cannot read the
`patches:` field).

Supported: `resources` (files and directories holding a kustomization.yaml), `images`
(name/newName/newTag/digest) and `patches` whose target is kind + name and whose inline patch is a
JSON 6902 list (add, remove, replace, test). Anything else raises KustomizeError naming the field,
so an overlay can never be built wrong silently. check_deploy.py compares this builder with
`kubectl kustomize` wherever both are available.
"""

import copy
import os

import yaml

_SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


class KustomizeError(Exception):
    pass


def _load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _pointer(path):
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer '{path}' must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts, path):
    node = doc
    for p in parts:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise KustomizeError(f"{path}: no list index '{p}'")
            node = node[int(p)]
        elif isinstance(node, dict):
            if p not in node:
                raise KustomizeError(f"{path}: no key '{p}'")
            node = node[p]
        else:
            raise KustomizeError(f"{path}: '{p}' indexes a scalar")
    return node


def apply_json_patch(doc, ops):
    """Applies JSON 6902 `ops` to a deep copy of `doc` and returns it."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        parts = _pointer(path)
        parent = _walk(doc, parts[:-1], path)
        key = parts[-1]
        if kind == "test":
            if _walk(doc, parts, path) != op.get("value"):
                raise KustomizeError(f"test {path} == {op.get('value')!r} failed")
        elif kind == "remove":
            _walk(doc, parts, path)
            if isinstance(parent, list):
                del parent[int(key)]
            else:
                del parent[key]
        elif kind == "replace":
            _walk(doc, parts, path)
            parent[int(key) if isinstance(parent, list) else key] = copy.deepcopy(op["value"])
        elif kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if key == "-":
                    parent.append(value)
                elif key.isdigit() and int(key) <= len(parent):
                    parent.insert(int(key), value)
                else:
                    raise KustomizeError(f"{path}: bad list index '{key}'")
            elif isinstance(parent, dict):
                parent[key] = value
            else:
                raise KustomizeError(f"{path}: parent is a scalar")
        else:
            raise KustomizeError(f"unsupported JSON patch op '{kind}' at {path}")
    return doc


def _image_name(image):
    """'registry/name:tag' -> 'registry/name' (a ':' after the last '/' starts the tag)."""
    image = image.split("@", 1)[0]
    slash = image.rfind("/")
    colon = image.rfind(":")
    return image[:colon] if colon > slash else image


def _set_images(objs, images):
    for spec in images:
        unknown = set(spec) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise KustomizeError(f"images: unsupported field(s) {sorted(unknown)}")
        for obj in objs:
            pod = (obj.get("spec") or {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if _image_name(c.get("image", "")) != spec["name"]:
                    continue
                name = spec.get("newName", spec["name"])
                if "digest" in spec:
                    c["image"] = f"{name}@{spec['digest']}"
                elif "newTag" in spec:
                    c["image"] = f"{name}:{spec['newTag']}"
                else:
                    old = c["image"].split("@", 1)[0]
                    tag = old[len(_image_name(old)):]
                    c["image"] = name + tag


def build(directory):
    """Returns the list of objects `kustomize build directory` would print (in no given order)."""
    kfile = os.path.join(directory, "kustomization.yaml")
    if not os.path.isfile(kfile):
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = _load_docs(kfile)[0]
    unknown = set(k) - _SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported field(s) {sorted(unknown)}")
    objs = []
    for res in k.get("resources", []):
        path = os.path.normpath(os.path.join(directory, res))
        objs.extend(build(path) if os.path.isdir(path) else _load_docs(path))
    _set_images(objs, k.get("images", []))
    for p in k.get("patches", []):
        target = p.get("target") or {}
        if set(target) - {"kind", "name"} or set(p) - {"target", "patch"} or "patch" not in p:
            raise KustomizeError(f"{kfile}: only inline JSON patches with a kind/name target")
        ops = yaml.safe_load(p["patch"])
        if not isinstance(ops, list):
            raise KustomizeError(f"{kfile}: patch for {target} is not a JSON 6902 list")
        hits = [i for i, o in enumerate(objs)
                if o.get("kind") == target.get("kind")
                and o.get("metadata", {}).get("name") == target.get("name")]
        if not hits:
            raise KustomizeError(f"{kfile}: patch target {target} matches no resource")
        for i in hits:
            objs[i] = apply_json_patch(objs[i], ops)
    return objs
