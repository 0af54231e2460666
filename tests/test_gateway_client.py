"""agentsched.client (the application's side) against a gateway over fake engines: workflow
headers reach the gateway, 429 Retry-After is honoured with bounded retries, a stream's error
event is raised as StreamError."""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest
from aiohttp import web

from agentsched.client import AsyncGatewayClient, GatewayClient, StreamError
from tests.deploy_fixtures import free_port, thread_gateway
from tests.gateway_fakes import FakeEngine, fake_cluster
from tests.test_gateway_unit import AlwaysFirst, wait_until


def test_workflow_headers_reach_the_gateway(tmp_path):
    with FakeEngine("a") as a:
        with thread_gateway(fake_cluster(tmp_path, [a]), AlwaysFirst()) as gw:
            client = GatewayClient(gw.url, tenant="team-a")
            with client.workflow(slo_s=12.5) as wf:
                r = wf.completion("extract_keywords", model="tiny", prompt="q", max_tokens=2)
                assert r.choices[0].text == " x x"
                open_now = gw.gateway.state.open_workflows
                assert [(w.key, w.tenant, w.slo_s) for w in open_now.values()] == [(wf.workflow_id, "team-a", 12.5)]
                chunks = list(wf.completion("revise", model="tiny", prompt="q", max_tokens=3, stream=True, last=True))
            assert sum(1 for c in chunks if c.choices) == 3
            # the gateway closes the stream's call just after its last byte
            wait_until(lambda: gw.gateway.state.finished_workflows == 1, what="workflow finished")
            assert not gw.gateway.state.open_workflows
            with pytest.raises(openai.APIStatusError) as err:  # a finished workflow's id is not reused
                with client.workflow(workflow_id=wf.workflow_id) as again:
                    again.completion("revise", model="tiny", prompt="q", max_tokens=1)
            assert err.value.status_code == 409
            client.close()


def test_stream_error_event_raises(tmp_path):
    with FakeEngine("a") as a:
        a.break_stream_after = 1
        with thread_gateway(fake_cluster(tmp_path, [a]), AlwaysFirst()) as gw:
            async def run() -> list:
                client = AsyncGatewayClient(gw.url)
                got = []
                async with client.workflow() as wf:
                    stream = await wf.completion("revise", model="tiny", prompt="q", max_tokens=4, stream=True)
                    with pytest.raises(StreamError, match="incomplete"):
                        async for chunk in stream:
                            got.append(chunk)
                await client.close()
                return got

            got = asyncio.run(run())
    assert len(got) == 1  # the one whole event before the break


class RateLimited:
    """A stand-in gateway that answers 429 (Retry-After: 0) `n` times, then 200."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            app = web.Application()
            app.router.add_post("/v1/completions", self.handle)
            runner = web.AppRunner(app)
            self.loop.run_until_complete(runner.setup())
            self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            self.runner = runner
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen += 1
        if self.seen <= self.n:
            return web.json_response({"error": {"message": "full", "type": "rate_limit_error", "code": 429}},
                                     status=429, headers={"Retry-After": "7"})
        return web.json_response({"id": "c", "object": "text_completion", "created": 0, "model": "tiny",
                                  "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]})


@pytest.mark.parametrize("limited,retries,succeeds", [(2, 3, True), (4, 3, False)])
def test_429_retry_after_is_honoured_and_bounded(limited, retries, succeeds):
    server = RateLimited(limited)
    waits: list[float] = []
    client = GatewayClient(f"http://127.0.0.1:{server.port}", max_retries=retries, max_retry_wait_s=5,
                           sleep=waits.append)
    with client.workflow() as wf:
        if succeeds:
            assert wf.completion("revise", model="tiny", prompt="q").choices[0].text == "ok"
        else:
            with pytest.raises(openai.RateLimitError):
                wf.completion("revise", model="tiny", prompt="q")
    assert waits == [5.0] * min(limited, retries)  # Retry-After 7 s, capped at max_retry_wait_s
    assert server.seen == min(limited, retries) + 1


@pytest.mark.parametrize("stream", [True, False])
def test_replay_runs_through_the_client(tmp_path, stream):
    """`agentsched replay` sends its calls with agentsched.client: every workflow is tagged and
    finishes at the gateway; streamed calls get their first-token time."""
    import math

    from deploy.replay import ReplayConfig, replay

    with FakeEngine("a") as a, FakeEngine("b") as b:
        with thread_gateway(fake_cluster(tmp_path, [a, b]), AlwaysFirst()) as gw:
            result, replayer = replay(ReplayConfig(gateway=gw.url, trace="chess_trace1", rate_qps=20.0, slo_scale=3.0,
                                                   token_scale=0.01, queries=2, seed=1, stream=stream))
            state = gw.gateway.state
            wait_until(lambda: state.finished_workflows == 2, what="workflows finished")
            assert not state.open_workflows
    assert result["n_finished"] == 2 and result["n_failed"] == 0
    assert {c.engine for c in replayer.calls} == {"a"}
    assert all(math.isnan(c.first_token_s) != stream for c in replayer.calls)
