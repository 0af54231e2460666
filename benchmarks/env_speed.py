"""Env speed: steps per wall-second of each Gymnasium env under a random (masked) policy, one
process, envs made with `gymnasium.make` as users get them. Target: >= 20,000 steps/s for
Dispatch-v0 on the default scenario (paper cluster).

Simulator and env timings alternate in rounds, and the best round is reported with the median:
on a shared machine the best round is the least disturbed one. Also prints the simulator's own
speed on the same episodes (decisions/s answered by a random
heuristic, no env), which bounds what any env over it can reach, and the env's overhead per step.

Run: .venv/bin/python benchmarks/env_speed.py [--steps N] [--scenario FILE] [--max-engines K]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np

import envs.gym  # noqa: F401  (registers the envs)
from agentsched.cli import ScriptArgumentParser, run_argparse_script
from envs.gym.scenario import Scenario
from envs.sim.scenario import build_simulator

TARGET_DISPATCH_STEPS_PER_S = 20_000


def dispatch_speed(scenario: Scenario, steps: int, max_engines: int | None, seed: int) -> tuple[float, float, int]:
    """(steps/s of the whole loop, steps/s inside env.step only, episodes)."""
    env = gym.make("agentsched/Dispatch-v0", scenario=scenario, max_engines=max_engines)
    env.action_space.seed(seed)
    obs, info = env.reset(seed=seed)
    sample = env.action_space.sample  # draws among the currently valid engines
    in_step = 0.0
    episodes = 0
    clock = time.perf_counter
    started = clock()
    for _ in range(steps):
        action = sample()
        t0 = clock()
        obs, reward, terminated, truncated, info = env.step(action)
        in_step += clock() - t0
        if terminated or truncated:
            episodes += 1
            obs, info = env.reset()
    total = clock() - started
    return steps / total, steps / in_step, episodes


def simulator_speed(scenario: Scenario, decisions: int, seed: int) -> float:
    """Decisions/s of the bare simulator on the scenario's episodes, answered by a random choice."""
    from policies import load_policy

    policy = load_policy("random")
    rng = np.random.default_rng(seed)
    done = 0
    wall = 0.0
    while done < decisions:
        spec = scenario.run_spec(scenario.draw_episode_seed(rng))
        policy.reset()
        sim = build_simulator(spec, queue_key=load_policy("hexgen").queue_key)
        started = time.perf_counter()
        sim.run(policy)
        wall += time.perf_counter() - started
        done += sim.decisions
    return done / wall


def knobs_speed(scenario: Scenario, steps: int, seed: int) -> float:
    env = gym.make("agentsched/Knobs-v0", scenario=scenario)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    started = time.perf_counter()
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = ScriptArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50_000, help="Dispatch-v0 steps to time (over all rounds)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternate simulator and env timings in this many rounds; report the best and median "
                             "(on a shared machine the best round is the least disturbed one)")
    parser.add_argument("--knobs-steps", type=int, default=1_000, help="Knobs-v0 steps to time")
    parser.add_argument("--scenario", default=None, help="scenario YAML or shipped name (default: the default Scenario)")
    parser.add_argument("--max-engines", type=int, default=None, help="pad Dispatch-v0 to this many engines")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scenario = Scenario.coerce(args.scenario)
    per_round = max(1, args.steps // args.rounds)
    sims, steps, loops, episodes = [], [], [], 0
    for r in range(args.rounds):
        sims.append(simulator_speed(scenario, per_round, args.seed + r))
        loop_rate, step_rate, eps = dispatch_speed(scenario, per_round, args.max_engines, args.seed + r)
        steps.append(step_rate)
        loops.append(loop_rate)
        episodes += eps
    med = statistics.median
    padding = f", padded to {args.max_engines} engines" if args.max_engines else ""
    print(f"scenario {scenario.name!r}{padding}: {args.rounds} rounds of {per_round:,} steps ({episodes} episodes)")
    print(f"simulator alone (random dispatcher, same episodes): best {max(sims):,.0f}, median {med(sims):,.0f} decisions/s")
    print(f"Dispatch-v0 in env.step: best {max(steps):,.0f}, median {med(steps):,.0f} steps/s "
          f"(whole loop with the random masked policy and resets: best {max(loops):,.0f}, median {med(loops):,.0f})")
    overhead_us = (1.0 / max(steps) - 1.0 / max(sims)) * 1e6
    print(f"env overhead over the simulator (best rounds): {overhead_us:.1f} us/step; env/simulator speed "
          f"{max(steps) / max(sims):.2f}")
    print(f"Dispatch-v0 target {TARGET_DISPATCH_STEPS_PER_S:,} steps/s -> ratio {max(steps) / TARGET_DISPATCH_STEPS_PER_S:.2f}x "
          f"(best round; median {med(steps) / TARGET_DISPATCH_STEPS_PER_S:.2f}x)")
    knobs_rate = knobs_speed(scenario, args.knobs_steps, args.seed)
    print(f"Knobs-v0: {knobs_rate:,.0f} steps/s (each step runs 30 simulated seconds of decisions)")


if __name__ == "__main__":
    run_argparse_script(main)
