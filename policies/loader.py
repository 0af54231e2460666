"""`load_policy(name_or_path)`: heuristic names, policy files (YAML/JSON) and trained policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from heuristics import registry
from policies.base import Policy, PolicyError
from policies.combined import combined_from_spec
from policies.heuristic import HeuristicPolicy
from policies.lookahead import is_lookahead_name, lookahead_from_name, lookahead_from_spec
from policies.trained import load_trained_policy

POLICY_FILE_SUFFIXES = (".yaml", ".yml", ".json")
# shipped policies, each a directory in one layout: policy.yaml (+ model.zip for a network),
# config.yaml (how it was made), REPORT.md and eval_report.json
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
RECOMMENDED_POLICY = "least-work+workflow"
LEARNED_POLICY = "learned"


def shipped_policies() -> list[str]:
    """Names of the policies in policies/pretrained/ (each loads by name: `--policy learned`)."""
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "policy.yaml").is_file())


def policy_from_spec(spec: dict[str, Any], source: str = "policy") -> Policy:
    """A policy from its spec: either dispatch/local sections, or `base: <policy name>` with knob
    overrides in the sections (`{base: hexgen, dispatch: {alpha: 0.3}}`)."""
    if not isinstance(spec, dict):
        raise PolicyError(f"{source}: a policy file must be a mapping with 'kind' (heuristic or trained)")
    kind = spec.get("kind", "heuristic")
    if kind != "heuristic":
        raise PolicyError(f"{source}: kind: unknown policy kind {kind!r} (use 'heuristic', 'combined' or "
                          f"'lookahead-knobs', or a trained policy directory)")
    unknown = sorted(set(spec) - {"kind", "name", "base", "dispatch", "local", "admission", "meta"})
    if unknown:
        raise PolicyError(f"{source}: unknown field {unknown[0]!r} (fields: kind, name, base, dispatch, local, "
                          f"admission, meta)")
    admission = spec.get("admission")
    if admission is not None and not (isinstance(admission, dict) and "name" in admission):
        raise PolicyError(f"{source}: admission: must be a mapping like {{name: defer-late, margin: 1.5}}, got {admission!r}")
    sections = {}
    for section in ("dispatch", "local"):
        value = spec.get(section) or {}
        if not isinstance(value, dict):
            raise PolicyError(f"{source}: {section}: must be a mapping like {{name: ..., knob: value}}, got {value!r}")
        sections[section] = dict(value)
    dispatch, local = sections["dispatch"], sections["local"]
    base = spec.get("base")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyError(f"{source}: name: must be a string, got {name!r}")
    if base is not None:  # a named policy with knob overrides
        if base not in registry.NAMED:
            raise PolicyError(f"{source}: base: unknown policy name {base!r} (known: {', '.join(registry.NAMED)})")
        entry = registry.NAMED[base]
        if dispatch.get("name", entry.dispatch) == entry.dispatch:
            dispatch = {**entry.dispatch_knobs, **dispatch}
        if local.get("name", entry.local) == entry.local:
            local = {**entry.local_knobs, **local}
        dispatch.setdefault("name", entry.dispatch)
        local.setdefault("name", entry.local)
        name = name or base
    if "name" not in dispatch or "name" not in local:
        raise PolicyError(f"{source}: needs dispatch.name and local.name (or base: a policy name)")
    d_name, l_name = dispatch.pop("name"), local.pop("name")
    return HeuristicPolicy.build(d_name, l_name, dispatch, local, name=name, admission=admission)


def policy_label(ref: str | Path | dict[str, Any]) -> str:
    """A policy reference's name in tables and reports: a name as it is; a spec's name; a policy
    file's stem, or its directory's name for the shipped layout (`NAME/policy.yaml`); a trained
    policy directory's name (`NAME/policy`, `best_policy`, ... are named after their run)."""
    if isinstance(ref, dict):
        return str(ref.get("name") or ref.get("base") or "policy")
    p = Path(ref)
    if p.suffix in POLICY_FILE_SUFFIXES:
        return p.parent.name if p.stem == "policy" and p.parent.name else p.stem
    if p.exists():
        if p.name in ("policy", "best_policy", "final_policy"):
            return p.parent.name if p.name == "policy" else f"{p.parent.name}/{p.name}"
        return p.name
    return str(ref)


def load_policy(name_or_path: str | Path) -> Policy:
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir() and (path / "policy.yaml").is_file():
        kind = (yaml.safe_load((path / "policy.yaml").read_text()) or {}).get("kind")
        if kind in ("heuristic", "combined"):
            path = path / "policy.yaml"  # a shipped heuristic in the directory layout
    if path.exists():
        if path.is_dir() or path.suffix == ".zip":
            return load_trained_policy(path)  # needs the [train] extra (torch, SB3) only to run the network
        if path.suffix not in POLICY_FILE_SUFFIXES:
            raise PolicyError(f"policy: {path} must be a .yaml/.json policy file or a trained policy directory")
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise PolicyError(f"policy: {path} cannot be parsed ({exc.__class__.__name__}); fix the file syntax") from None
        if isinstance(raw, dict) and raw.get("kind") == "combined":
            return combined_from_spec(raw, path.parent, source=f"policy file {path.name}", load_policy=load_policy)
        if isinstance(raw, dict) and raw.get("kind") == "lookahead-knobs":
            return lookahead_from_spec(raw, load_policy, source=f"policy file {path.name}")
        return policy_from_spec(raw, source=f"policy file {path.name}")
    if is_lookahead_name(text):  # simulator-in-the-loop planners over a base policy (policies/lookahead.py)
        return lookahead_from_name(text, load_policy)
    if text.endswith(POLICY_FILE_SUFFIXES) or "/" in text:
        raise PolicyError(f"policy: file {text} not found (check the path)")
    if text not in registry.NAMED and text in shipped_policies():
        return load_policy(PRETRAINED_DIR / text)
    if text not in registry.NAMED:
        raise PolicyError(f"policy: unknown policy name {text!r} (heuristics: {', '.join(registry.NAMED)}; shipped: "
                          f"{', '.join(shipped_policies())}; or give a policy file or trained policy directory)")
    return HeuristicPolicy.named(text)


def save_policy(policy: Policy, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    spec = {**policy.spec(), **(extra or {})}
    path = Path(path)
    with open(path, "w") as handle:
        if path.suffix == ".json":
            json.dump(spec, handle, indent=2)
        else:
            yaml.safe_dump(spec, handle, sort_keys=False)
