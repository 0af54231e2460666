"""Warm start: behaviour cloning of a heuristic's dispatch decisions, with optional DAgger.

Why: PPO from a random network spends most of a small compute budget re-discovering what the
paper's heuristic already knows (send calls to fast engines, balance work), and a random
dispatcher at heavy load produces episodes with almost no SLO-met workflows, so the reward says
little. Cloning the heuristic first puts the policy at the heuristic's score at step 0; RL then
only has to learn the *difference*.

Procedure (CleanRL-style, one function per stage):
1. `collect`: run episodes in Dispatch-v0, acting with the expert (or, in DAgger rounds, with the
   current network), and record (observation, action mask, expert action, reward).
2. `fit`: minimise the cross-entropy between the network's *masked* action distribution and the
   expert's action; optionally regress the value head on the discounted returns of expert
   episodes, so PPO's first advantage estimates are not noise that immediately pushes the cloned
   policy away from the expert.
3. DAgger (Ross et al. 2011): roll out the learner, label the states it visits with the expert's
   action, aggregate, refit; this fixes the compounding error of pure cloning (the learner drifts
   to states the expert never visits).

`agreement` measures the share of states on which the network's most probable valid action equals
the expert's, on expert episodes of *other* seeds than the training data.

Distilling a planner (issue 16): the expert may be a `lookahead` policy, which labels every state
with its planned choice. It departs from its base policy on few states, and those departures are
all the planner adds, so `override_weight` weights them up in the loss and the report gives the
clone's agreement on them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from envs.gym.admission_env import AdmissionDispatchEnv
from policies.lookahead import LookaheadPolicy

MASKED_LOGIT = -1e8


@dataclass
class Dataset:
    obs: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)  # discounted return from the state (expert episodes only)
    has_return: list[bool] = field(default_factory=list)
    overrides: list[bool] = field(default_factory=list)  # a lookahead expert overrode its base policy here

    def __len__(self) -> int:
        return len(self.actions)

    def extend(self, other: "Dataset") -> None:
        self.obs += other.obs
        self.masks += other.masks
        self.actions += other.actions
        self.returns += other.returns
        self.has_return += other.has_return
        self.overrides += other.overrides

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (np.asarray(self.obs, dtype=np.float32), np.asarray(self.masks, dtype=bool),
                np.asarray(self.actions, dtype=np.int64), np.asarray(self.returns, dtype=np.float32),
                np.asarray(self.has_return, dtype=bool))


def masked_logits(policy: Any, obs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Action logits of an SB3 actor-critic policy with invalid actions pushed to -1e8."""
    features = policy.extract_features(obs, policy.pi_features_extractor)
    latent_pi = policy.mlp_extractor.forward_actor(features)
    logits = policy.action_net(latent_pi)
    return torch.where(masks, logits, torch.full_like(logits, MASKED_LOGIT))


def values(policy: Any, obs: torch.Tensor) -> torch.Tensor:
    features = policy.extract_features(obs, policy.vf_features_extractor)
    latent_vf = policy.mlp_extractor.forward_critic(features)
    return policy.value_net(latent_vf).squeeze(-1)


def learner_actions(policy: Any, obs: np.ndarray, masks: np.ndarray,
                    normalise: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    with torch.no_grad():
        logits = masked_logits(policy, torch.as_tensor(normalise(obs), dtype=torch.float32),
                               torch.as_tensor(masks, dtype=torch.bool))
    return logits.argmax(-1).numpy()


def collect(env: Any, expert: Any, seeds: list[int], gamma: float, learner: Any = None,
            normalise: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> tuple[Dataset, list[dict[str, Any]]]:
    """Episodes on `seeds`; act with the expert, or with `learner` (an SB3 policy) if given. Every
    state is labelled with the expert's action. Returns the data and each episode's metrics."""
    base = env.unwrapped
    data = Dataset()
    metrics = []
    for seed in seeds:
        obs, info = env.reset(options={"episode_seed": int(seed)})
        expert.reset()  # as the env does at its first use this episode: a planner's override count starts at 0 now
        rewards: list[float] = []
        done = False
        while not done:
            mask = np.asarray(info["action_mask"], dtype=bool)
            overrides_before = expert.changed if isinstance(expert, LookaheadPolicy) else 0
            expert_action = base.heuristic_action(expert)
            data.overrides.append(isinstance(expert, LookaheadPolicy) and expert.changed > overrides_before)
            data.obs.append(obs)
            data.masks.append(mask.copy())
            data.actions.append(expert_action)
            if learner is None:
                action = expert_action
            else:
                action = int(learner_actions(learner, obs[None], mask[None], normalise)[0])
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(float(reward))
            done = terminated or truncated
        metrics.append(info["metrics"])
        ret, returns = 0.0, []
        for r in reversed(rewards):
            ret = r + gamma * ret
            returns.append(ret)
        data.returns += returns[::-1]
        data.has_return += [learner is None] * len(rewards)
    return data, metrics


def fit(policy: Any, data: Dataset, epochs: int, batch_size: int, learning_rate: float, seed: int,
        value_pretrain: bool = True, normalise: Callable[[np.ndarray], np.ndarray] = lambda x: x,
        log: Callable[[str, float], None] | None = None, class_weights: np.ndarray | None = None,
        override_weight: float = 1.0) -> dict[str, float]:
    """Supervised fit of the policy (and value) head; returns the final losses and accuracy.
    `class_weights` (one per action) weights the cross-entropy, e.g. a rare action up;
    `override_weight` weights the states where a lookahead expert overrode its base."""
    obs, masks, actions, returns, has_ret = data.arrays()
    state_weight_t = None
    if override_weight != 1.0 and any(data.overrides):
        state_weight_t = torch.as_tensor(np.where(data.overrides, override_weight, 1.0), dtype=torch.float32)
    obs = normalise(obs)
    obs_t = torch.as_tensor(obs)
    masks_t = torch.as_tensor(masks)
    actions_t = torch.as_tensor(actions)
    returns_t = torch.as_tensor(returns)
    has_ret_t = torch.as_tensor(has_ret)
    weight_t = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    n = len(actions)
    policy.set_training_mode(True)
    stats: dict[str, float] = {}
    for _epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        total_ce = total_v = correct = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            logits = masked_logits(policy, obs_t[idx], masks_t[idx])
            if state_weight_t is None:
                ce = F.cross_entropy(logits, actions_t[idx], weight=weight_t)
            else:  # a weighted mean, as F.cross_entropy's own with class weights
                w = state_weight_t[idx] * (weight_t[actions_t[idx]] if weight_t is not None else 1.0)
                ce = (F.cross_entropy(logits, actions_t[idx], weight=weight_t, reduction="none")
                      * state_weight_t[idx]).sum() / w.sum()
            loss = ce
            v_loss = torch.zeros(())
            if value_pretrain and has_ret_t[idx].any():
                sel = idx[has_ret_t[idx]]
                v_loss = F.mse_loss(values(policy, obs_t[sel]), returns_t[sel])
                loss = loss + 0.5 * v_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            total_ce += float(ce.detach()) * len(idx)
            total_v += float(v_loss.detach()) * len(idx)
            correct += float((logits.argmax(-1) == actions_t[idx]).sum())
        stats = {"ce": total_ce / n, "value_mse": total_v / n, "train_accuracy": correct / n}
        if log is not None:
            for k, v in stats.items():
                log(f"warm_start/{k}", v)
    policy.set_training_mode(False)
    return stats


def agreement(policy: Any, data: Dataset, normalise: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> float:
    """Share of states where the policy's most probable valid action is the expert's."""
    obs, masks, actions, _, _ = data.arrays()
    if not len(actions):
        return float("nan")
    return float((learner_actions(policy, obs, masks, normalise) == actions).mean())


def agreement_on_overrides(policy: Any, data: Dataset,
                           normalise: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> tuple[float, int]:
    """Share of the states where a lookahead expert overrode its base on which the policy takes the
    planner's action (what distilling the planner adds over cloning its base), and their count."""
    obs, masks, actions, _, _ = data.arrays()
    sel = np.asarray(data.overrides, dtype=bool)
    if not sel.any():
        return float("nan"), 0
    return float((learner_actions(policy, obs[sel], masks[sel], normalise) == actions[sel]).mean()), int(sel.sum())


def agreement_on(policy: Any, data: Dataset, action: int,
                 normalise: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> tuple[float, int]:
    """Share of the states where the expert took `action` on which the policy takes it too (e.g.
    Dispatch-v1's defer: rare, so overall agreement hides whether it is cloned), and their count."""
    obs, masks, actions, _, _ = data.arrays()
    sel = actions == action
    if not sel.any():
        return float("nan"), 0
    return float((learner_actions(policy, obs[sel], masks[sel], normalise) == action).mean()), int(sel.sum())


def warm_start(model: Any, make_env: Callable[[int], Any], expert: Any | list[Any], *, scenarios: int, seeds: list[int],
               holdout_seeds: list[int], epochs: int, batch_size: int, learning_rate: float, dagger_rounds: int,
               value_pretrain: bool, seed: int, normalise: Callable[[np.ndarray], np.ndarray] = lambda x: x,
               log: Callable[[str, float], None] | None = None, progress: Callable[[str], None] | None = None,
               defer_weight: float = 1.0, override_weight: float = 1.0) -> dict[str, Any]:
    """Clone `expert` into `model.policy` (+ DAgger rounds). Episodes rotate over the scenarios
    (`make_env(i)` builds an env of scenario i); `expert` may be a list with one expert per
    scenario. Returns a report with the agreement figures. `defer_weight`: Dispatch-v1's defer
    action's weight in the loss; `override_weight`: that of the states where a lookahead expert
    overrode its base."""
    gamma = float(getattr(model, "gamma", 0.99))
    say = progress or (lambda s: None)
    envs = [make_env(i) for i in range(scenarios)]
    weights = None
    if isinstance(envs[0].unwrapped, AdmissionDispatchEnv) and defer_weight != 1.0:
        weights = np.ones(envs[0].unwrapped.defer_action + 1, dtype=np.float32)
        weights[-1] = defer_weight
    experts = list(expert) if isinstance(expert, (list, tuple)) else [expert] * scenarios
    if len(experts) != scenarios:
        raise ValueError(f"{len(experts)} experts for {scenarios} scenarios")

    def run(seed_list: list[int], learner: Any = None) -> tuple[Dataset, list[dict]]:
        data, metrics = Dataset(), []
        for k, s in enumerate(seed_list):
            i = k % len(envs)
            d, m = collect(envs[i], experts[i], [s], gamma, learner, normalise)
            data.extend(d)
            metrics += m
        return data, metrics

    say(f"warm start: collecting {len(seeds)} expert episodes")
    data, expert_metrics = run(seeds)
    holdout, _ = run(holdout_seeds)
    names = [getattr(e, "name", str(e)) for e in experts]
    report: dict[str, Any] = {"expert": names[0] if len(set(names)) == 1 else names, "rounds": []}
    stats = fit(model.policy, data, epochs, batch_size, learning_rate, seed, value_pretrain, normalise, log, weights,
                override_weight)
    agree = agreement(model.policy, holdout, normalise)
    report["rounds"].append({"round": 0, "samples": len(data), **stats, "holdout_agreement": agree})
    say(f"warm start: BC on {len(data)} states, holdout agreement {agree:.3f}")
    for r in range(1, dagger_rounds + 1):
        visited, _ = run([s + 7919 * r for s in seeds[: max(1, len(seeds) // 2)]], learner=model.policy)
        on_policy_agree = agreement(model.policy, visited, normalise)
        data.extend(visited)
        stats = fit(model.policy, data, max(1, epochs // 2), batch_size, learning_rate, seed + r, value_pretrain,
                    normalise, log, weights, override_weight)
        agree = agreement(model.policy, holdout, normalise)
        report["rounds"].append({"round": r, "samples": len(data), **stats, "holdout_agreement": agree,
                                 "learner_states_agreement_before_refit": on_policy_agree})
        say(f"warm start: DAgger round {r}: {len(data)} states, learner-state agreement {on_policy_agree:.3f} "
            f"-> holdout agreement {agree:.3f}")
    report["holdout_agreement"] = agree
    report["holdout_states"] = len(holdout)
    if isinstance(envs[0].unwrapped, AdmissionDispatchEnv):
        recall, n = agreement_on(model.policy, holdout, envs[0].unwrapped.defer_action, normalise)
        report["holdout_defer_agreement"], report["holdout_defer_states"] = recall, n
        say(f"warm start: holdout defer agreement {recall:.3f} on {n} states the expert deferred")
    if any(data.overrides):
        recall, n = agreement_on_overrides(model.policy, holdout, normalise)
        report["holdout_override_agreement"], report["holdout_override_states"] = recall, n
        report["train_override_states"] = int(sum(data.overrides))
        say(f"warm start: holdout agreement {recall:.3f} on {n} states where the planner overrode its base")
    report["expert_goodput_qps"] = float(np.mean([m["goodput_qps"] for m in expert_metrics]))
    for env in envs:
        env.close()
    return report
