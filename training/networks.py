"""Network architectures for Dispatch-v0: score every engine with one shared network.

Why not the default MLP: the dispatch decision is an argmax over engines of a score that depends
on the engine's own row (speed for this step, backlog, share of work) *relative to the others*
(HexGen's W_e / W_base, "fastest engine" T_base / T_e). A flat MLP over the padded vector has to
learn that comparison separately for every engine slot and cannot transfer between a 4-engine and
a 12-engine cluster. Scoring each engine with shared weights from (its row, its row minus the
cluster mean, the call/global context) is permutation-equivariant, needs far fewer samples, and
lets one network serve any cluster up to `max_engines` (the pointer-network / DeepSets idea used
in learned schedulers such as Decima).

`EngineScoringPolicy` (PPO) and `MaskableEngineScoringPolicy` (MaskablePPO) replace SB3's
`mlp_extractor` with `EngineScorer`; the actor's latent *is* the per-engine logits, so
`action_net` is the identity. Use them in a config with `policy: EngineScoringPolicy`.

Dispatch-v1 (`policy_kwargs: {scorer_admission: true}`): one more logit, "defer the call's
workflow", from the call/workflow context, the pooled engine rows and a linear path on the context
(a slack-versus-remaining-work threshold, as in the defer-late heuristic, is one layer away).
"""

from __future__ import annotations

from typing import Any

import torch
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from envs.observation.admission import ADMISSION_FEATURES
from envs.observation.dispatch import ENGINE_FEATURES, ENGINE_FEATURES_V1, N_HEAD

N_ENGINE_FEATURES = len(ENGINE_FEATURES)
# models saved before observation spec v2 do not record their row width: they have v1 rows; the
# indices below are the same in every version (later versions append features)
N_ENGINE_FEATURES_V1 = len(ENGINE_FEATURES_V1)
HEALTHY = ENGINE_FEATURES.index("healthy")
RELATIVE_SPEED = ENGINE_FEATURES.index("relative_speed")
ASSIGNED_SHARE = ENGINE_FEATURES.index("assigned_share")
EXPECTED_FINISH = ENGINE_FEATURES.index("expected_finish")
N_DERIVED = 4
SHARE_RATIO_CLIP = 10.0
DERIVED_GAIN = 10.0  # gaps between engines are small numbers that decide the argmax


def _mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers)


class EngineScorer(nn.Module):
    """features (B, N_HEAD + E*F) -> (per-engine logits (B, E), value latent (B, hidden))."""

    def __init__(self, features_dim: int, hidden: int = 64, context: int = 32,
                 engine_features: int = N_ENGINE_FEATURES_V1, admission: bool = False):
        super().__init__()
        nf = self.engine_features = engine_features
        self.n_extra = len(ADMISSION_FEATURES) if admission else 0  # Dispatch-v1's features after the rows
        self.max_engines = (features_dim - N_HEAD - self.n_extra) // nf
        if N_HEAD + self.max_engines * nf + self.n_extra != features_dim:
            raise ValueError(f"observation size {features_dim} is not a Dispatch-v{int(admission)} observation "
                             f"({N_HEAD} + max_engines x {nf}{f' + {self.n_extra}' if admission else ''})")
        self.head = _mlp([N_HEAD, context])
        self.score = nn.Sequential(_mlp([2 * nf + N_DERIVED + context, hidden, hidden]), nn.Linear(hidden, 1))
        # linear path next to the MLP: scores that are (nearly) linear in the engine's features, like
        # HexGen's alpha x speed - (1 - alpha) x W_e / W_base, need large, exact weights that a tanh
        # MLP learns slowly; the skip makes them one layer away
        self.linear = nn.Linear(2 * nf + N_DERIVED, 1)
        # learned inverse temperature of the logits: cloning a deterministic argmax over close scores
        # needs sharp logits; exp() lets the scale grow geometrically instead of via every weight
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.engine_embed = _mlp([2 * nf + N_DERIVED, hidden])
        self.critic = _mlp([context + hidden, hidden])
        self.admission = bool(admission)
        if self.admission:  # Dispatch-v1: the defer logit after the engines'
            self.defer_embed = _mlp([2 * nf + N_DERIVED, hidden])
            self.defer = nn.Sequential(_mlp([context + hidden + self.n_extra, hidden]), nn.Linear(hidden, 1))
            self.defer_linear = nn.Linear(N_HEAD + self.n_extra, 1)
            self.critic = _mlp([context + hidden + self.n_extra, hidden])
        self.latent_dim_pi = self.max_engines + int(self.admission)
        self.latent_dim_vf = hidden

    def _split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head = features[:, :N_HEAD]
        rows = features[:, N_HEAD:N_HEAD + self.max_engines * self.engine_features].reshape(
            -1, self.max_engines, self.engine_features)
        # padding rows are all zero; a real engine always has relative_speed > 0
        real = (rows[..., RELATIVE_SPEED] > 0).float().unsqueeze(-1)
        n_real = real.sum(1, keepdim=True).clamp(min=1.0)
        mean = (rows * real).sum(1, keepdim=True) / n_real
        per_engine = torch.cat([rows, (rows - mean) * real, self._derived(rows, real)], dim=-1)
        return head, per_engine, real

    @staticmethod
    def _derived(rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Comparisons a tanh MLP finds hard to form from raw rows, made explicit:
        - W_e / W_base: the engine's share of assigned work over the fastest engine's (HexGen's
          load term; the fastest engine is the one with relative speed 1), and its gap to the
          smallest over healthy engines (x DERIVED_GAIN);
        - expected finish minus the best expected finish over healthy engines (least-work's term);
        - whether the engine has the best expected finish.
        """
        speed = rows[..., RELATIVE_SPEED]
        share = rows[..., ASSIGNED_SHARE]
        fastest = (speed >= speed.max(1, keepdim=True).values - 1e-6).float()
        base_share = (share * fastest).sum(1, keepdim=True) / fastest.sum(1, keepdim=True).clamp(min=1.0)
        ratio = torch.where(base_share > 1e-6, share / base_share.clamp(min=1e-6), share * 0.0)
        healthy = rows[..., HEALTHY] > 0.5
        finish = rows[..., EXPECTED_FINISH]
        best = torch.where(healthy, finish, torch.full_like(finish, 1e6)).min(1, keepdim=True).values
        gap = torch.where(healthy, finish - best, torch.zeros_like(finish))
        is_best = (healthy & (gap <= 1e-6)).float()
        ratio = ratio.clamp(max=SHARE_RATIO_CLIP)
        min_ratio = torch.where(healthy, ratio, torch.full_like(ratio, 1e6)).min(1, keepdim=True).values
        ratio_gap = torch.where(healthy, ratio - min_ratio, torch.zeros_like(ratio))
        out = torch.stack([ratio, ratio_gap * DERIVED_GAIN, gap * DERIVED_GAIN, is_best], dim=-1)
        return out * real

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        head, per_engine, real = self._split(features)
        context = self.head(head)
        ctx = context.unsqueeze(1).expand(-1, self.max_engines, -1)
        logits = (self.score(torch.cat([per_engine, ctx], dim=-1)) + self.linear(per_engine)).squeeze(-1)
        if self.admission:
            emb = self.defer_embed(per_engine)
            pooled = (emb * real).sum(1) / real.sum(1).clamp(min=1.0)
            extra = features[:, features.shape[1] - self.n_extra:]
            defer = self.defer(torch.cat([context, pooled, extra], dim=-1)) + self.defer_linear(torch.cat([head, extra], -1))
            logits = torch.cat([logits, defer], dim=-1)
        return logits * self.log_scale.exp()

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        head, per_engine, real = self._split(features)
        emb = self.engine_embed(per_engine)
        pooled = (emb * real).sum(1) / real.sum(1).clamp(min=1.0)
        parts = [self.head(head), pooled]
        if self.n_extra:
            parts.append(features[:, features.shape[1] - self.n_extra:])
        return self.critic(torch.cat(parts, dim=-1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class _EngineScoringMixin:
    """Swap SB3's MlpExtractor for EngineScorer and make action_net the identity."""

    def __init__(self, *args: Any, scorer_hidden: int = 64, scorer_context: int = 32,
                 engine_features: int = N_ENGINE_FEATURES_V1, scorer_admission: bool = False, **kwargs: Any):
        self._scorer_admission = scorer_admission  # Dispatch-v1: one more logit (defer)
        self._scorer_hidden = scorer_hidden
        self._scorer_context = scorer_context
        self._engine_features = engine_features  # row width of the observation spec (training passes it)
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = EngineScorer(self.features_dim, self._scorer_hidden, self._scorer_context,
                                          self._engine_features, self._scorer_admission)

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        self.action_net = nn.Identity()
        # the last scoring layer starts small, like SB3's action_net (gain 0.01): near-uniform at init
        scorer = self.mlp_extractor
        lasts = [scorer.score[-1], scorer.linear] + ([scorer.defer[-1], scorer.defer_linear] if scorer.admission else [])
        for last in lasts:
            nn.init.orthogonal_(last.weight, gain=0.01)
            nn.init.zeros_(last.bias)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(scorer_hidden=self._scorer_hidden, scorer_context=self._scorer_context,
                    engine_features=self._engine_features)
        if self._scorer_admission:  # absent for Dispatch-v0 models, so their saved parameters stay as they were
            data["scorer_admission"] = True
        return data


class EngineScoringPolicy(_EngineScoringMixin, ActorCriticPolicy):
    """PPO actor-critic with per-engine shared scoring."""


class MaskableEngineScoringPolicy(_EngineScoringMixin, MaskableActorCriticPolicy):
    """MaskablePPO actor-critic with per-engine shared scoring."""


POLICY_CLASSES = {"EngineScoringPolicy": (EngineScoringPolicy, MaskableEngineScoringPolicy)}


def resolve_policy(name: str, algo: str) -> Any:
    """A policy name from a config: SB3's own names pass through; ours map to classes."""
    if name in POLICY_CLASSES:
        plain, maskable = POLICY_CLASSES[name]
        return maskable if algo == "maskable_ppo" else plain
    return name
