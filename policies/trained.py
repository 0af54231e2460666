"""Trained policies: an SB3 model plus everything needed to run it the way it was trained.

A trained policy is a directory (or a zip of one) holding

    policy.yaml        kind: trained; env id, algorithm, observation-spec version and fingerprint,
                       max_engines, the local order (Dispatch) or heuristic (Knobs) it runs with
    model.zip          the stable-baselines3 model (`Algorithm.save`)
    obs_rms.npz        observation normalisation statistics (VecNormalize), if trained with them
    config.yaml        the training config (reproducibility)
    eval_report.json   the evaluation report written by `agentsched evaluate`, if any

`load_trained_policy(path)` gives a `Policy` that the simulator, the Gymnasium envs and the deploy
gateway call like any heuristic:

- a Dispatch policy answers `dispatch(call, cluster)` by building exactly the env's observation
  (`envs.observation.dispatch.DispatchObservation`) from the read-only view, normalising it with the
  saved statistics, and taking the most probable *valid* engine (healthy, not padding);
  `queue_key` is its local heuristic's;
- a Knobs policy is the heuristic it was trained over; every `interval_s` its network reads the
  Knobs env's observation and sets the heuristic's knobs (`on_interval`).

Statistics are stored as plain arrays (npz), not a pickled VecNormalize, so loading a policy never
unpickles code and does not need the training env.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from envs import ADMISSION_ENV_ID, DISPATCH_ENV_ID, KNOBS_ENV_ID
from envs.observation import dispatch as dispatch_observation
from envs.observation import knobs as knobs_observation_module
from envs.observation.admission import ADMISSION_FEATURES, AdmissionObservation
from envs.observation.dispatch import OBS_VERSION, SUPPORTED_OBS_VERSIONS, DispatchObservation
from envs.observation.knobs import DEFAULT_KNOBS, Knob, KnobsObservation
from envs.sim.view import CallView, ClusterView, EngineView
from heuristics import registry
from policies.base import Policy, PolicyError
from policies.heuristic import HeuristicPolicy, resolve_local_order

FORMAT_VERSION = 1
METADATA_FILE = "policy.yaml"
MODEL_FILE = "model.zip"
OBS_RMS_FILE = "obs_rms.npz"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "eval_report.json"

ALGORITHMS = ("ppo", "maskable_ppo", "sac")


def algorithm_class(algo: str) -> Any:
    """The SB3 class of an algorithm name used in configs and metadata."""
    algo = algo.lower().replace("-", "_")
    if algo == "ppo":
        from stable_baselines3 import PPO

        return PPO
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        return MaskablePPO
    if algo == "sac":
        from stable_baselines3 import SAC

        return SAC
    raise PolicyError(f"algorithm: unknown {algo!r} (use one of {', '.join(ALGORITHMS)})")


# ---- observation spec -------------------------------------------------------------------------
def observation_spec(env_id: str, version: int | None = None) -> dict[str, Any]:
    """Version and fingerprint of the observation an env id builds in this checkout.

    The version is the env module's `OBS_VERSION` (1 if it does not declare one), which its owner
    bumps when units or scaling change; the fingerprint hashes the feature names and the clip bound,
    so a change of layout is caught even if nobody bumped the version. Dispatch-v0 still builds its
    older versions (`version`, for policies trained on them).
    """
    if env_id in (DISPATCH_ENV_ID, ADMISSION_ENV_ID):  # Dispatch-v1: v0's vector + admission features
        mod = dispatch_observation
        version = mod.OBS_VERSION if version is None else version
        features = mod.engine_features(version) if version in mod.SUPPORTED_OBS_VERSIONS else mod.ENGINE_FEATURES
        names = [*mod.GLOBAL_FEATURES, *mod.CALL_FEATURES, *mod.WORKFLOW_FEATURES, "|", *features]
        if env_id == ADMISSION_ENV_ID:
            names += ["|", *ADMISSION_FEATURES]
        digest = hashlib.sha1(json.dumps([names, float(mod.OBS_CLIP)]).encode()).hexdigest()[:12]
        return {"version": int(version), "fingerprint": digest}
    if env_id == KNOBS_ENV_ID:
        knobs_mod = knobs_observation_module
        names = [*knobs_mod.GLOBAL_FEATURES, "|", *knobs_mod.GPU_TYPE_FEATURES]
        digest = hashlib.sha1(json.dumps([names, float(dispatch_observation.OBS_CLIP)]).encode()).hexdigest()[:12]
        return {"version": int(knobs_mod.OBS_VERSION), "fingerprint": digest}
    raise PolicyError(f"env id {env_id!r} is not an agentsched env (use {DISPATCH_ENV_ID} or {KNOBS_ENV_ID})")


# ---- the policy classes ---------------------------------------------------------------------------
class _Network:
    """The SB3 model's policy network as a function obs -> action logits / action, on CPU, no grad."""

    def __init__(self, model: Any, obs_rms: dict[str, np.ndarray] | None, compiled: bool = False):
        import torch

        # one decision is a few small matrix products: intra-op threads only add synchronisation,
        # and on a busy machine their spin-waits cost 100x the arithmetic (measured: 45 s vs 0.4 s
        # for a 60-query run with 2 threads on 2 loaded cores)
        torch.set_num_threads(1)
        self.torch = torch
        self.model = model
        self.policy = model.policy
        self.policy.set_training_mode(False)
        self.obs_rms = obs_rms
        # a loaded policy's weights never change: its actor is traced and frozen once (TorchScript),
        # which halves the per-decision cost (Python overhead of a few dozen small ops) with identical
        # outputs; the live model during training stays eager (freezing would snapshot its weights)
        self.compiled = compiled
        self._actor: Any = None

    def normalise(self, obs: np.ndarray) -> np.ndarray:
        rms = self.obs_rms
        if rms is None:
            return obs
        return np.clip((obs - rms["mean"]) / np.sqrt(rms["var"] + rms["epsilon"]),
                       -rms["clip_obs"], rms["clip_obs"]).astype(np.float32)

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Unmasked action logits of a discrete policy for one observation."""
        torch = self.torch
        with torch.inference_mode():
            tensor = torch.as_tensor(self.normalise(obs)[None], dtype=torch.float32)
            if self.compiled:
                if self._actor is None:
                    self._actor = torch.jit.freeze(torch.jit.trace(_actor_module(self.policy), tensor).eval())
                return self._actor(tensor)[0].numpy()
            features = self.policy.extract_features(tensor, self.policy.pi_features_extractor)
            latent_pi = self.policy.mlp_extractor.forward_actor(features)
            return self.policy.action_net(latent_pi)[0].numpy()

    def act_continuous(self, obs: np.ndarray) -> np.ndarray:
        action, _ = self.model.predict(self.normalise(obs), deterministic=True)
        return np.asarray(action, dtype=np.float32)


def _actor_module(policy: Any) -> Any:
    """The actor path of an SB3 policy as one torch module (obs -> logits), for tracing."""
    import torch

    class Actor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.policy = policy

        def forward(self, obs: Any) -> Any:
            features = self.policy.extract_features(obs, self.policy.pi_features_extractor)
            return self.policy.action_net(self.policy.mlp_extractor.forward_actor(features))

    return Actor()


class TrainedPolicy(Policy):
    """Common part: metadata, the network, validation against a cluster or env."""

    def __init__(self, path: Path, meta: dict[str, Any], network: _Network):
        self.path = path
        self.meta = meta
        self.net = network
        self.name = str(meta.get("name") or path.name)
        self.env_id = meta["env_id"]
        self.max_engines = int(meta["max_engines"]) if meta.get("max_engines") else None

    def check_cluster(self, cluster: ClusterView) -> None:
        n = len(cluster.engines)
        if self.max_engines is not None and n > self.max_engines:
            raise PolicyError(f"policy {self.path}: cluster has {n} engines but the policy was trained with "
                              f"max_engines={self.max_engines}; retrain with a larger max_engines")

    def check_env(self, env: Any) -> None:
        """Fail with one line if `env` (a Gymnasium env, wrapped or not) does not fit this policy."""
        base = getattr(env, "unwrapped", env)
        env_id = getattr(getattr(base, "spec", None), "id", None)
        if env_id is not None and env_id != self.env_id:
            raise PolicyError(f"policy {self.path}: trained on {self.env_id}, not {env_id}")
        space = getattr(base, "observation_space", None)
        expected = self.meta.get("observation_shape")
        if space is not None and expected is not None and list(space.shape) != list(expected):
            raise PolicyError(f"policy {self.path}: observation shape {list(space.shape)} of the env does not match "
                              f"the policy's {expected} (different max_engines or observation spec)")

    def spec(self) -> dict[str, Any]:
        return {"kind": "trained", "name": self.name, "path": str(self.path), "env_id": self.env_id,
                "algo": self.meta.get("algo")}


class TrainedDispatchPolicy(TrainedPolicy):
    """A Dispatch-v0 network as the global layer, with its local heuristic's queue order."""

    def __init__(self, path: Path, meta: dict[str, Any], network: _Network):
        super().__init__(path, meta, network)

        local = meta.get("local") or {}
        self._queue_key, self.local_order_name = resolve_local_order(local.get("name", "urgency"), local.get("knobs"))
        # the observation spec the network was trained on (older specs are still built)
        spec = meta.get("observation_spec") or {}  # absent while training: the current spec
        if self.max_engines is None:  # load_trained_policy checks this first, with the same line
            raise PolicyError(f"policy: {path}: a Dispatch policy needs max_engines in {METADATA_FILE}")
        self._obs = DispatchObservation(self.max_engines, int(spec.get("version", OBS_VERSION)))
        self._bound: Any = None

    def reset(self) -> None:
        self._bound = None

    def observation(self, call: CallView, cluster: ClusterView) -> np.ndarray:
        """The env's observation of `call` in `cluster` (any ClusterView: simulator or gateway)."""
        if cluster is not self._bound:
            self.check_cluster(cluster)
            self._bound = cluster
        return self._obs.build(call, cluster)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        logits = self.net.logits(self.observation(call, cluster))
        engines = cluster.engines
        best, best_logit = -1, -math.inf
        for i, e in enumerate(engines):
            if e.healthy and logits[i] > best_logit:
                best, best_logit = i, float(logits[i])
        if best < 0:
            raise RuntimeError("no healthy engine")  # the simulator and the gateway never ask then
        return best

    def action_logits(self, obs: np.ndarray) -> np.ndarray:
        return self.net.logits(obs)

    def queue_key(self, call: CallView, engine: EngineView) -> float:
        return self._queue_key(call, engine)


class TrainedAdmissionPolicy(TrainedDispatchPolicy):
    """A Dispatch-v1 network: admission and engine in one decision (`admit`, then `dispatch`).

    `admit(call, cluster)` takes the most probable valid action over the engines and "defer"; if it
    is an engine, `dispatch` of the same call returns it. The calls of a workflow this policy
    deferred go to its base policy's engine, as in the env (`metadata base_policy`). A caller that
    never asks `admit` gets the network's best engine for every call, with every workflow admitted
    (the simulator and the gateway both ask)."""

    def __init__(self, path: Path, meta: dict[str, Any], network: _Network):
        super().__init__(path, meta, network)
        base = dict(meta.get("base_policy") or {})
        if "dispatch" not in base or "local" not in base:
            raise PolicyError(f"policy: {path}: a Dispatch-v1 policy needs base_policy (dispatch, local) in {METADATA_FILE}")
        dispatch, local = dict(base["dispatch"]), dict(base["local"])
        self.base = HeuristicPolicy.build(dispatch.pop("name"), local.pop("name"), dispatch, local,
                                          name=str(base.get("name", "base")))
        self._decided: tuple[int, int] = (-1, -1)  # (call id, engine) of the last admitted call
        self._deferred: set[int] = set()
        self._defer_action = self._obs.max_engines  # the action after the last engine slot
        self._admission_obs = AdmissionObservation(self._defer_action, dispatch=self._obs)

    def observation(self, call: CallView, cluster: ClusterView) -> np.ndarray:
        """The Dispatch-v1 env's observation (v0's + admission features, with this policy's deferrals)."""
        if cluster is not self._bound:
            self.check_cluster(cluster)
            self._bound = cluster
            self._deferred = set()
        return self._admission_obs.build(call, cluster, self._deferred)

    def reset(self) -> None:
        super().reset()
        self.base.reset()
        self._decided = (-1, -1)
        self._deferred = set()

    def _best(self, logits: np.ndarray, cluster: ClusterView, with_defer: bool) -> int:
        best, best_logit = -1, -math.inf
        for i, e in enumerate(cluster.engines):
            if e.healthy and logits[i] > best_logit:
                best, best_logit = i, float(logits[i])
        if with_defer and logits[self._defer_action] > best_logit:
            return self._defer_action
        return best

    def admit(self, call: CallView, cluster: ClusterView) -> bool:
        choice = self._best(self.net.logits(self.observation(call, cluster)), cluster, with_defer=True)
        if choice == self._defer_action:
            self._deferred.add(call.workflow_id)
            return False
        self._decided = (call.call_id, choice)
        return True

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        if call.workflow_id in self._deferred and cluster is self._bound:
            return self.base.dispatch(call, cluster)
        if self._decided[0] == call.call_id and cluster is self._bound:
            return self._decided[1]
        return self._best(self.net.logits(self.observation(call, cluster)), cluster, with_defer=False)


class TrainedKnobsPolicy(TrainedPolicy):
    """A Knobs-v0 network driving a heuristic's knobs every control interval.

    Timing as in the env: the first knobs are chosen at the first decision of an episode, then
    at every tick of `interval_s` (`on_interval`), each from the observation of the interval that
    just ended (`envs.gym.knobs_env.KnobsObservation`, which needs a simulator-like cluster)."""

    def __init__(self, path: Path, meta: dict[str, Any], network: _Network):
        super().__init__(path, meta, network)

        self.interval_s = float(meta["interval_s"])
        self.base_name = str(meta["heuristic"].get("base", "hexgen"))
        raw_knobs = (meta.get("env_kwargs") or {}).get("knobs")
        self.knobs = [Knob.model_validate(k) for k in raw_knobs] if raw_knobs else list(DEFAULT_KNOBS)
        self._observer = KnobsObservation(len(self.knobs))
        self.heuristic = self._heuristic_for(None)
        self._action: np.ndarray | None = None
        self._bound: Any = None
        self.knob_history: list[dict[str, float]] = []

    def _heuristic_for(self, action: np.ndarray | None) -> Any:

        named = registry.NAMED[self.base_name]
        if action is None:
            return HeuristicPolicy.named(self.base_name)
        values = self.knobs_for(action)
        d = {**named.dispatch_knobs, **{k.name: values[k.name] for k in self.knobs if k.layer == "dispatch"}}
        loc = {**named.local_knobs, **{k.name: values[k.name] for k in self.knobs if k.layer == "local"}}
        return HeuristicPolicy.build(named.dispatch, named.local, d, loc, name=self.name)

    def knobs_for(self, action: np.ndarray) -> dict[str, float]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        return {k.name: float(k.low + (x + 1.0) * 0.5 * (k.high - k.low)) for k, x in zip(self.knobs, a)}

    def _default_action(self) -> np.ndarray:
        base = self._heuristic_for(None)
        found = {**base.dispatcher.get_knobs(), **base.local.get_knobs()}
        return np.array([2.0 * (float(found[k.name]) - k.low) / (k.high - k.low) - 1.0 for k in self.knobs],
                        dtype=np.float32)

    def reset(self) -> None:
        self.heuristic = self._heuristic_for(None)
        self._action = None
        self._bound = None
        self.knob_history = []

    def _decide(self, cluster: ClusterView) -> None:
        assert self._action is not None, "bind() sets the default action before the first decision"
        obs = self._observer.build(cluster, self._action)
        self._action = np.clip(self.net.act_continuous(obs), -1.0, 1.0)
        self.heuristic = self._heuristic_for(self._action)
        self.knob_history.append({"t_s": float(cluster.now_s), **self.knobs_for(self._action)})
        self._observer.start_interval(cluster)

    def on_interval(self, cluster: ClusterView) -> None:
        if self._bound is not cluster:
            return  # no decision yet in this episode (the first comes with the first call)
        self._decide(cluster)

    def bind(self, cluster: ClusterView) -> None:
        """First knob decision of an episode, when the policy first sees `cluster`."""
        if self._bound is not cluster:
            self.check_cluster(cluster)
            self._bound = cluster
            self._observer.reset(cluster)
            self._action = self._default_action()
            self._decide(cluster)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        self.bind(cluster)
        return self.heuristic.dispatch(call, cluster)

    def queue_key(self, call: CallView, engine: EngineView) -> float:
        return self.heuristic.queue_key(call, engine)


# ---- save / load --------------------------------------------------------------------------------------
def save_trained_policy(out_dir: str | Path, model: Any, *, env_id: str, algo: str, max_engines: int | None,
                        observation_shape: list[int], local: dict[str, Any] | None = None,
                        obs_rms: Any = None, config: dict[str, Any] | None = None, name: str | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
    """Write a trained policy directory; returns its path. `obs_rms` is a VecNormalize (or its
    `obs_rms`) whose statistics are stored; `extra` goes into the metadata (Knobs: heuristic,
    interval_s, env_kwargs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    meta: dict[str, Any] = {
        "kind": "trained",
        "format_version": FORMAT_VERSION,
        "name": name or out.name,
        "env_id": env_id,
        "algo": algo,
        "observation_spec": observation_spec(env_id),
        "observation_shape": [int(x) for x in observation_shape],
        "max_engines": max_engines,
        "normalized": obs_rms is not None,
    }
    if local is not None:
        meta["local"] = local
    meta.update(extra or {})
    if obs_rms is not None:
        venv_clip = getattr(obs_rms, "clip_obs", None)
        venv_eps = getattr(obs_rms, "epsilon", None)
        rms = getattr(obs_rms, "obs_rms", obs_rms)
        np.savez(out / OBS_RMS_FILE, mean=np.asarray(rms.mean, dtype=np.float32), var=np.asarray(rms.var, dtype=np.float32),
                 clip_obs=np.float32(venv_clip if venv_clip is not None else 10.0),
                 epsilon=np.float32(venv_eps if venv_eps is not None else 1e-8))
    (out / METADATA_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    if config is not None:
        (out / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.exists():
        raise PolicyError(f"policy: {path} is not a trained policy directory (no {METADATA_FILE}); "
                          f"give a directory written by `agentsched train`")
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except yaml.YAMLError:
        raise PolicyError(f"policy: {meta_path} cannot be parsed; fix or regenerate it") from None
    if not isinstance(meta, dict) or meta.get("kind") != "trained":
        raise PolicyError(f"policy: {meta_path} must have kind: trained")
    for field in ("env_id", "algo", "observation_spec", "observation_shape"):
        if field not in meta:
            raise PolicyError(f"policy: {meta_path}: missing field {field!r} (regenerate with `agentsched train`)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise PolicyError(f"policy: {path} has format_version {meta['format_version']}; this agentsched reads up to "
                          f"{FORMAT_VERSION} (upgrade agentsched)")
    return meta


def check_observation_spec(path: Path, meta: dict[str, Any]) -> None:
    trained = meta["observation_spec"]
    current = observation_spec(meta["env_id"])
    if meta["env_id"] in (DISPATCH_ENV_ID, ADMISSION_ENV_ID) and isinstance(trained.get("version"), int):

        if trained["version"] in SUPPORTED_OBS_VERSIONS:  # an older spec this checkout still builds
            current = observation_spec(meta["env_id"], trained["version"])
    if trained.get("version") != current["version"] or trained.get("fingerprint") != current["fingerprint"]:
        raise PolicyError(
            f"policy: {path} was trained on {meta['env_id']} observation spec v{trained.get('version')} "
            f"({trained.get('fingerprint')}) but this agentsched builds v{current['version']} "
            f"({current['fingerprint']}); retrain it (agentsched train) or use the matching agentsched version")


def _extract_zip(path: Path, target: Path) -> Path:
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise PolicyError(f"policy: {path} contains an unsafe path {member!r}")
            zf.extractall(target)
    except zipfile.BadZipFile:
        raise PolicyError(f"policy: {path} is not a valid zip file") from None
    if (target / METADATA_FILE).exists():
        return target
    subdirs = [p for p in target.iterdir() if p.is_dir() and (p / METADATA_FILE).exists()]
    if len(subdirs) == 1:
        return subdirs[0]
    raise PolicyError(f"policy: {path} has no {METADATA_FILE} at its top level (zip a policy directory)")


def zip_trained_policy(path: str | Path, out_zip: str | Path) -> Path:
    """Zip a trained policy directory (files at the zip's top level)."""
    path, out_zip = Path(path), Path(out_zip)
    with zipfile.ZipFile(out_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.iterdir()):
            if f.is_file():
                zf.write(f, f.name)
    return out_zip


def load_trained_policy(path: str | Path) -> TrainedPolicy:
    """A trained policy directory or zip as a `Policy`; errors are one-line `PolicyError`s."""
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"policy: {path} not found (check the path)")
    if path.suffix == ".zip" and path.is_file():
        # everything is read into memory, so the extracted copy goes away at once
        with tempfile.TemporaryDirectory(prefix="agentsched-policy-") as tmp:
            return _load_trained_root(path, _extract_zip(path, Path(tmp)))
    return _load_trained_root(path, path)


def _load_trained_root(path: Path, root: Path) -> TrainedPolicy:
    """`root` holds the policy's files; `path` is what the user named (for messages)."""
    meta = read_metadata(root)
    # a model.zip alone (not a policy directory) is caught by read_metadata
    check_observation_spec(path, meta)
    model_path = root / MODEL_FILE
    if not model_path.exists():
        raise PolicyError(f"policy: {path} has no {MODEL_FILE}")
    cls = algorithm_class(meta["algo"])
    try:
        model = cls.load(model_path, device="cpu")
    except Exception as exc:  # a corrupt or foreign zip: one line, not a traceback
        raise PolicyError(f"policy: {model_path} cannot be loaded by {cls.__name__} ({exc.__class__.__name__}: {exc})") from None
    obs_rms = None
    if meta.get("normalized"):
        rms_path = root / OBS_RMS_FILE
        if not rms_path.exists():
            raise PolicyError(f"policy: {path} says normalized: true but has no {OBS_RMS_FILE}")
        with np.load(rms_path) as data:
            obs_rms = {k: data[k] for k in ("mean", "var", "clip_obs", "epsilon")}
    expected_shape = tuple(meta["observation_shape"])
    if tuple(model.observation_space.shape) != expected_shape:
        raise PolicyError(f"policy: {path}: model observation shape {model.observation_space.shape} does not match "
                          f"policy.yaml's {list(expected_shape)}")
    network = _Network(model, obs_rms, compiled=True)
    if meta["env_id"] == ADMISSION_ENV_ID:
        if meta.get("max_engines") is None:
            raise PolicyError(f"policy: {path}: a Dispatch policy needs max_engines in {METADATA_FILE}")
        return TrainedAdmissionPolicy(path, meta, network)
    if meta["env_id"] == DISPATCH_ENV_ID:
        if meta.get("max_engines") is None:
            raise PolicyError(f"policy: {path}: a Dispatch policy needs max_engines in {METADATA_FILE}")
        return TrainedDispatchPolicy(path, meta, network)
    if meta["env_id"] == KNOBS_ENV_ID:
        for field in ("heuristic", "interval_s"):
            if field not in meta:
                raise PolicyError(f"policy: {path}: a Knobs policy needs {field!r} in {METADATA_FILE}")
        return TrainedKnobsPolicy(path, meta, network)
    raise PolicyError(f"policy: {path}: env_id {meta['env_id']!r} is not supported")


def read_report(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    report = path / REPORT_FILE
    return json.loads(report.read_text()) if report.exists() else None


def copy_policy(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
