"""`load_policy(name_or_path)`: heuristic names, policy files (YAML/JSON) and trained policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from policies.base import Policy, PolicyError
from policies.heuristic import HeuristicPolicy

POLICY_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def policy_from_spec(spec: dict[str, Any], source: str = "policy") -> Policy:
    if not isinstance(spec, dict):
        raise PolicyError(f"{source}: a policy file must be a mapping with 'kind' (heuristic or trained)")
    kind = spec.get("kind", "heuristic")
    if kind != "heuristic":
        raise PolicyError(f"{source}: kind: unknown policy kind {kind!r} (use 'heuristic', or a trained policy directory)")
    dispatch = dict(spec.get("dispatch") or {})
    local = dict(spec.get("local") or {})
    base = spec.get("base")
    if base is not None:  # a named policy with knob overrides
        from heuristics import registry

        if base not in registry.NAMED:
            raise PolicyError(f"{source}: base: unknown policy name {base!r} (known: {', '.join(registry.NAMED)})")
        dispatch.setdefault("name", registry.NAMED[base][0])
        local.setdefault("name", registry.NAMED[base][1])
    if "name" not in dispatch or "name" not in local:
        raise PolicyError(f"{source}: needs dispatch.name and local.name (or base: a policy name)")
    d_name, l_name = dispatch.pop("name"), local.pop("name")
    return HeuristicPolicy.build(d_name, l_name, dispatch, local, name=spec.get("name"))


def load_policy(name_or_path: str | Path) -> Policy:
    text = str(name_or_path)
    path = Path(text)
    if path.exists():
        if path.is_dir() or path.suffix == ".zip":
            try:
                from policies.trained import load_trained_policy
            except ModuleNotFoundError:
                raise PolicyError(f"policy: {path} looks like a trained policy but trained policies are not available") from None
            return load_trained_policy(path)
        if path.suffix not in POLICY_FILE_SUFFIXES:
            raise PolicyError(f"policy: {path} must be a .yaml/.json policy file or a trained policy directory")
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise PolicyError(f"policy: {path} cannot be parsed ({exc.__class__.__name__}); fix the file syntax") from None
        return policy_from_spec(raw, source=f"policy file {path.name}")
    if text.endswith(POLICY_FILE_SUFFIXES) or "/" in text:
        raise PolicyError(f"policy: file {text} not found (check the path)")
    return HeuristicPolicy.named(text)


def save_policy(policy: Policy, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    spec = {**policy.spec(), **(extra or {})}
    path = Path(path)
    with open(path, "w") as handle:
        if path.suffix == ".json":
            json.dump(spec, handle, indent=2)
        else:
            yaml.safe_dump(spec, handle, sort_keys=False)
