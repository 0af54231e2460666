"""The whole `agentsched` surface, walked with bad input: every mistake is exactly one line on
stderr naming the option or field, exit code 2, no traceback, and nothing is started (no
simulation, no engine, no gateway). A bug still gives its traceback and exit code 1.

Runs `agentsched.cli.main` in-process (fast); a few cases go through the real entry point in a
subprocess, since that is what users run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentsched.cli import command_names, main

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = str(ROOT / "deploy" / "clusters" / "local-cpu.yaml")

# what each command would start: a test case that reaches one of these has not been validated up front
ENTRY_POINTS = ("envs.sim.cluster.ClusterSimulator.run", "heuristics.bench.run_bench", "heuristics.tune.run_tpe",
                "heuristics.tune.run_grid", "heuristics.plan.run_plan", "heuristics.league.run_league", "training.train.train", "training.tune.tune_rl",
                "training.evaluate.evaluate",
                "deploy.gateway.server.run_gateway", "deploy.engines.engines_up", "deploy.engines.engines_down",
                "deploy.engines.run_tiny_model_builder", "deploy.replay.replay", "deploy.calibrate.calibrate")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Bad input files, one per kind of mistake."""
    d = tmp_path_factory.mktemp("bad")
    written = {
        "bad_yaml": ("bad.yaml", "engines: [unclosed\n"),
        "bad_json": ("trace.json", "not json"),
        "bad_call": ("call.json", '[{"Text2SQLRequest": [{"step": "x", "input_length": -5, "output_length": 3}]}]'),
        "bad_cluster": ("cluster.yaml", "engines:\n  - {gpu: A100-80G, model: Llama-3.1-70B, colour: red}\n"),
        "bad_policy": ("policy.yaml", "base: hexgen\ndispatch: {alpha: 2}\n"),
        "bad_tenants": ("tenants.yaml", "- {name: x, slo_scale: -1}\n"),
        "bad_template": ("flow.yaml", "stages:\n  - step: a\n    input_tokens: {median: -3}\n    output_tokens: {median: 5}\n"),
        # a call no engine of the paper's cluster can hold (vLLM would refuse it everywhere)
        "huge_template": ("huge.yaml", "stages:\n  - step: plan\n    input_tokens: {median: 1000000000, max: 2000000000}\n"
                                       "    output_tokens: {median: 10}\n"),
        "sac_dispatch": ("sac.yaml", "name: x\nalgo: sac\nenv_id: agentsched/Dispatch-v0\n"),
        "eval_overlap": ("overlap.yaml", "name: x\neval: {seeds: [5]}\n"),
        "bad_scenario": ("scenario.yaml", "name: x\nscenarios:\n  - {rate_qps: -1}\n"),
        "bad_env_kwargs": ("envkw.yaml", "name: x\nenv_kwargs: {max_engine: 4}\n"),
        "experts_mismatch": ("experts.yaml", "name: x\nscenarios: [{}, {}]\nwarm_start: {scenario_experts: [rr]}\n"),
        "a_file": ("plain.txt", "not a directory\n"),
    }
    out = {}
    for key, (name, text) in written.items():
        (d / name).write_text(text)
        out[key] = str(d / name)
    out["missing"] = str(d / "missing.yaml")
    out["dir"] = str(d)
    return out


# (command line, text the one line must contain). {name} is a file of the `files` fixture.
CASES: list[tuple[list[str], str]] = [
    # typer's own usage errors, on the commands of the issue
    (["simulat"], "simulate"),
    (["nosuchcommand"], "commands:"),
    (["simulate", "--ratee", "1"], "--ratee"),
    (["simulate", "--rate", "abc"], "--rate"),
    (["simulate", "--seed", "abc"], "--seed"),
    (["simulate", "--queries", "1.5"], "--queries"),
    (["serve", "--cluster", LOCAL_CLUSTER, "--policy", "rr", "--port", "70000"], "--port"),
    (["train"], "--config"),
    (["tune", "--trials", "abc"], "--trials"),
    # simulate
    (["simulate", "--rate", "0"], "--rate"),
    (["simulate", "--rate", "inf"], "--rate"),
    (["simulate", "--slo-scale", "-1"], "--slo-scale"),
    (["simulate", "--burstiness", "nan"], "--burstiness"),
    (["simulate", "--queries", "0"], "--queries"),
    (["simulate", "--seed", "-1"], "--seed"),
    (["simulate", "--trace", "{missing}"], "missing.yaml"),
    (["simulate", "--trace", "{bad_json}"], "not valid JSON"),
    (["simulate", "--trace", "{bad_call}"], "input_length"),
    (["simulate", "--trace", "{bad_template}"], "stages.0.input_tokens.median"),
    (["simulate", "--trace", "{huge_template}"], "largest KV cache"),
    (["simulate", "--cluster", "{bad_yaml}"], "not valid YAML"),
    (["simulate", "--cluster", "{bad_cluster}"], "colour"),
    (["simulate", "--cluster", "nosuch"], "nosuch"),
    (["simulate", "--policy", "{bad_policy}"], "alpha"),
    (["simulate", "--policy", "nonsense"], "nonsense"),
    (["simulate", "--tenants", "{bad_tenants}"], "slo_scale"),
    (["simulate", "--tenants", "{missing}"], "--tenants"),
    (["simulate", "--chrome-trace", "{a_file}/t.json"], "--chrome-trace"),
    (["simulate", "--chrome-trace", "/proc/timeline.json"], "directory /proc is not writable"),
    (["simulate", "--out", "{dir}"], "--out"),
    # bench
    (["bench", "--seeds", "1,,2"], "--seeds"),
    (["bench", "--seeds", "-1"], "--seeds"),
    (["bench", "--rates", "0.1,abc"], "--rates"),
    (["bench", "--slo-scales", "0"], "--slo-scales"),
    (["bench", "--policies", "rr,hexgne"], "hexgne"),
    (["bench", "--policies", ","], "--policies"),
    (["bench", "--workers", "0"], "--workers"),
    (["bench", "--ratio-scale", "0"], "--ratio-scale"),
    (["bench", "--trace", "{huge_template}"], "largest KV cache"),
    (["bench", "--trace", "nosuch"], "nosuch"),
    (["bench", "--out", "{a_file}"], "--out"),
    # tune
    (["tune", "--trials", "0"], "--trials"),
    (["tune", "--seeds", "0,1", "--test-seeds", "1,2"], "--test-seeds"),
    (["tune", "--rate", "nan"], "--rate"),
    (["tune", "--policy", "nope"], "nope"),
    (["tune", "--out", "{dir}/tuned.txt"], "--out"),
    # plan
    (["plan"], "--rate"),
    (["plan", "--rate", "0"], "--rate"),
    (["plan", "--rate", "0.1", "--load", "spiky"], "--load"),
    (["plan", "--rate", "0.1", "--gpus", "H200"], "--gpus"),
    (["plan", "--rate", "0.1", "--prices", "H100=x"], "--prices"),
    (["plan", "--rate", "0.1", "--target", "1.5"], "--target"),
    (["plan", "--rate", "0.1", "--seeds", "1", "--test-seeds", "1"], "--test-seeds"),
    (["plan", "--rate", "0.1", "--model", "GPT-9"], "GPT-9"),
    (["plan", "--rate", "0.1", "--out", "{a_file}"], "--out"),
    (["league", "--trials", "0"], "--trials"),
    (["league", "--policies", "nope"], "nope"),
    (["league", "--backend", "dask"], "--backend"),
    (["league", "--tune-seeds", "1", "--test-seeds", "1"], "--test-seeds"),
    (["league", "--slo-scale", "-1"], "--slo-scale"),
    (["league", "--out", "{a_file}"], "--out"),
    (["bench", "--backend", "dask"], "--backend"),
    (["evaluate", "--policy", "rr", "--backend", "dask"], "--backend"),
    # policies
    (["policies", "--all"], "--all"),
    # train
    (["train", "--config", "{missing}"], "--config"),
    (["train", "--config", "{bad_yaml}"], "not valid YAML"),
    (["train", "--config", "{sac_dispatch}"], "does not fit"),
    (["train", "--config", "{eval_overlap}"], "eval.seeds"),
    (["train", "--config", "{bad_scenario}"], "scenarios.0.rate_qps"),
    (["train", "--config", "{experts_mismatch}"], "scenario_experts"),
    (["train", "--config", "{bad_env_kwargs}"], "env_kwargs.max_engine"),
    (["train", "--config", "smoke", "--total-timesteps", "0"], "--total-timesteps"),
    (["train", "--config", "smoke", "--n-envs", "x"], "--n-envs"),
    (["train", "--config", "smoke", "--warm-start", "nosuch"], "nosuch"),
    # tune-rl
    (["tune-rl"], "--config"),
    (["tune-rl", "--config", "smoke", "--backend", "dask"], "--backend"),
    (["tune-rl", "--config", "smoke", "--trials", "0"], "--trials"),
    (["tune-rl", "--config", "{bad_scenario}"], "scenarios.0.rate_qps"),
    # evaluate
    (["evaluate"], "--policy"),
    (["evaluate", "--policy", "hexgen", "--confidence", "1.5"], "--confidence"),
    (["evaluate", "--policy", "hexgen", "--seeds", "5-1"], "--seeds"),
    (["evaluate", "--policy", "hexgen", "--seeds", "1,,2"], "--seeds"),
    (["evaluate", "--policy", "hexgen", "--rate", "abc"], "--rate"),
    (["evaluate", "--policy", "hexgen", "--load", "wave"], "--load"),
    (["evaluate", "--policy", "hexgen", "--cluster", "nosuch"], "nosuch"),
    (["evaluate", "--policy", "hexgen", "--trace", "{huge_template}"], "largest KV cache"),
    (["evaluate", "--policy", "hexgen", "--baselines", "rr,,hexgen"], "--baselines"),
    (["evaluate", "--policy", "nope"], "nope"),
    (["evaluate", "--policy", "hexgen", "--out", "{a_file}"], "--out"),
    # serve
    (["serve", "--policy", "rr"], "--cluster"),
    (["serve", "--cluster", "{bad_yaml}", "--policy", "rr"], "not valid YAML"),
    (["serve", "--cluster", "{missing}", "--policy", "rr"], "does not exist"),
    (["serve", "--cluster", LOCAL_CLUSTER, "--policy", "no-such-policy"], "no-such-policy"),
    (["serve", "--cluster", LOCAL_CLUSTER, "--policy", "rr", "--log-level", "loud"], "--log-level"),
    # engines
    (["engines", "up"], "--cluster"),
    (["engines", "upp"], "up"),
    (["engines", "up", "--cluster", "{missing}"], "does not exist"),
    (["engines", "down", "--cluster", "{bad_yaml}"], "not valid YAML"),
    # replay
    (["replay", "--gateway", "http://127.0.0.1:9"], "--trace"),
    (["replay", "--gateway", "localhost:8000", "--trace", "chess_trace1", "--rate", "1", "--slo-scale", "3"], "--gateway"),
    (["replay", "--gateway", "http://127.0.0.1:9", "--trace", "chess_trace1", "--rate", "0", "--slo-scale", "3"], "--rate"),
    (["replay", "--gateway", "http://127.0.0.1:9", "--trace", "chess_trace1", "--rate", "1", "--slo-scale", "3",
      "--queries", "0"], "--queries"),
    (["replay", "--gateway", "http://127.0.0.1:9", "--trace", "{bad_json}", "--rate", "1", "--slo-scale", "3"],
     "not valid JSON"),
    # calibrate
    (["calibrate", "--engine", "127.0.0.1:8101"], "--engine"),
    (["calibrate", "--engine", "http://127.0.0.1:9", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["calibrate", "--engine", "http://127.0.0.1:9", "--out", "{a_file}/p.yaml"], "--out"),
    # make-tiny-model
    (["make-tiny-model"], "out_dir"),
    (["make-tiny-model", "{dir}/m", "--hidden", "100", "--heads", "3"], "--hidden"),
    (["make-tiny-model", "{dir}/m", "--layers", "0"], "--layers"),
]


@pytest.fixture
def nothing_starts(monkeypatch) -> None:
    """Anything that would run a simulation, a training, an engine or the gateway fails the test."""
    for target in ENTRY_POINTS:
        def started(*args: Any, _target: str = target, **kwargs: Any) -> None:
            raise AssertionError(f"{_target} was started: the input was not validated up front")

        monkeypatch.setattr(target, started)


def run_main(capsys, monkeypatch, args: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["agentsched", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _fill(args: list[str], files: dict[str, str]) -> list[str]:
    return [a.format(**files) for a in args]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2(args, needle, files, nothing_starts, capsys, monkeypatch):
    code, _, err = run_main(capsys, monkeypatch, _fill(args, files))
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_the_table_walks_every_command():
    """A command added later must get its bad inputs here too."""
    covered = {args[0] for args, _ in CASES} | {" ".join(args[:2]) for args, _ in CASES if args[0] == "engines"}
    expected = {name for name, group in command_names().items() if group is None}
    expected |= {f"engines {name}" for name in command_names(command_names()["engines"])}
    assert expected <= covered, sorted(expected - covered)


def test_internal_error_keeps_its_traceback(monkeypatch, capsys):
    """A bug is not a user mistake: main lets it through (Python prints the traceback, exit 1)."""
    def broken(spec: Any) -> None:
        raise RuntimeError("a bug in the simulator")

    monkeypatch.setattr("envs.cli.check_run", broken)
    monkeypatch.setattr(sys, "argv", ["agentsched", "simulate", "--queries", "2"])
    with pytest.raises(RuntimeError, match="a bug in the simulator"):
        main()
    assert "error:" not in capsys.readouterr().err


def _subprocess(*code_and_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_and_args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args,needle", [(["simulate", "--ratee", "1"], "--ratee"), (["simulat"], "simulate"),
                                         (["tune", "--trials", "abc"], "--trials")])
def test_real_entry_point_one_line_exit_2(args, needle):
    proc = _subprocess("-m", "agentsched.cli", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script,args,needle", [
    ("benchmarks/fork_speed.py", ["--ids", "nope"], "--ids"),
    ("benchmarks/reference_scores.py", ["--planners", "foo"], "--planners"),
    ("benchmarks/reference_scores.py", ["--intervals-only", "--out", "runs/no-such-table.json"], "--out"),
    ("benchmarks/tune_cells.py", ["--no-such-flag"], "--no-such-flag"),
    ("benchmarks/sim_speed.py", ["--repeats", "abc"], "--repeats"),  # argparse's own usage error
    ("benchmarks/sim_vs_real.py", ["--cluster", "runs/no-such-cluster.yaml"], "--cluster"),  # a UserError
])
def test_benchmark_scripts_one_line_exit_2(script, args, needle):
    """The scripts under benchmarks/ take the command's error path: `agentsched.cli.run_script` for
    the typer ones, `ScriptArgumentParser` and `run_argparse_script` for the argparse ones."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and needle in proc.stderr
    assert f"see '{Path(script).name} --help'" in proc.stderr


def test_real_entry_point_bug_is_traceback_exit_1():
    proc = _subprocess("-c", "import sys, envs.cli, agentsched.cli\n"
                             "def broken(spec): raise RuntimeError('a bug in the simulator')\n"
                             "envs.cli.check_run = broken\n"
                             "sys.argv = ['agentsched', 'simulate', '--queries', '2']\n"
                             "agentsched.cli.main()\n")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug in the simulator" in proc.stderr


def test_no_command_prints_help_exit_0(capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, [])
    assert code == 0 and "simulate" in out and "evaluate" in out and not err
    code, out, err = run_main(capsys, monkeypatch, ["engines"])
    assert code == 0 and "up" in out and "down" in out and not err


def test_list_parser_is_shared_and_strict():
    import typer

    from agentsched.options import parse_float_list, parse_int_list, parse_text_list

    assert parse_int_list("200000-200002,7,7") == [200000, 200001, 200002, 7]
    assert parse_float_list("0.4, 0.1,0.1") == [0.1, 0.4]
    assert parse_text_list("rr, hexgen") == ["rr", "hexgen"]
    for parse, text in ((parse_int_list, "1,,2"), (parse_int_list, "1,"), (parse_int_list, "a"), (parse_int_list, "-1"),
                        (parse_float_list, "0"), (parse_float_list, "inf"), (parse_text_list, " , ")):
        with pytest.raises(typer.BadParameter):
            parse(text)


def test_bench_takes_a_yaml_workflow_template_like_simulate():
    """`bench --trace react-agent.yaml` goes through the same loader as `simulate --trace`."""
    from heuristics.bench import capacity_qps_estimate
    from heuristics.cli import check_scenario

    check_scenario("react-agent.yaml", "paper", 5, [0, 1])
    assert capacity_qps_estimate("react-agent.yaml", "paper", False) > capacity_qps_estimate("chess_trace1", "paper", False)


def test_calls_too_large_for_some_engines_show_in_the_printed_table(tmp_path, capsys, monkeypatch):
    """A call that fits the A100s but not the A6000/L40S of the paper's cluster: round robin sends
    some to the small engines, and the table and a warning say so (not only the JSON)."""
    flow = tmp_path / "mid.yaml"
    flow.write_text("stages:\n  - step: plan\n    input_tokens: {median: 30000}\n    output_tokens: {median: 10}\n")
    code, out, err = run_main(capsys, monkeypatch, ["simulate", "--trace", str(flow), "--queries", "8", "--policy", "rr"])
    assert code == 0, err
    row = next(line for line in out.splitlines() if "n_failed" in line)
    n_failed = int(row.split("│")[2])
    assert n_failed > 0 and f"warning: {n_failed} workflows failed" in out


def test_click_and_typer_usage_errors_are_both_user_errors():
    """typer >= 0.26 vendors Click (its errors are not click's); either family is one line."""
    import click
    import typer
    from pydantic import BaseModel, PositiveInt, ValidationError

    from agentsched.errors import format_user_error

    class Model(BaseModel):
        n: PositiveInt

    try:
        Model(n=0)
    except ValidationError as exc:
        invalid = exc
    assert format_user_error(click.BadParameter("bad value", param_hint="'--x'")) == "Invalid value for '--x': bad value"
    assert format_user_error(click.UsageError("No such option: --y")) == "No such option: --y"
    assert format_user_error(typer.BadParameter("bad value", param_hint="'--x'")) == "Invalid value for '--x': bad value"
    assert format_user_error(invalid).startswith("n: Input should be greater than 0")
    assert format_user_error(FileNotFoundError(2, "No such file", "x.yaml")) == "file not found: x.yaml (check the path)"
    assert format_user_error(RuntimeError("bug")) is None
    assert format_user_error(KeyError("seed_base")) is None


def test_evaluate_without_out_says_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, monkeypatch, ["evaluate", "--policy", "hexgen", "--baselines", "rr", "--queries", "4",
                                                    "--seeds", "0-1"])
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("nothing written: pass --out DIR")
    assert not list(tmp_path.iterdir())
