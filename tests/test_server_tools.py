"""Tool calls the model writes on its own (tool_choice auto): a checkpoint rigged to answer every
prompt with `[find(q=7)]`, served for real and read with the openai client."""

from __future__ import annotations

import json

import pytest

from llama4_local.tokenizer import Tokenizer
from tests.server_util import ServerProcess, bigram_checkpoint

openai = pytest.importorskip("openai")

CALL = "[find(q=7)]"
FIND = {
    "type": "function",
    "function": {
        "name": "find",
        "description": "Look something up",
        "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}, "required": ["q"]},
    },
}
OTHER = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Find seven."}]


@pytest.fixture(scope="module")
def client(scout_ckpt, tmp_path_factory):
    tok = Tokenizer(scout_ckpt)
    chain = [tok.token_id(c) for c in CALL] + [tok.token_id("<|eot|>")]
    ckpt = bigram_checkpoint(scout_ckpt, tmp_path_factory.mktemp("rigged") / "model", chain)
    server = ServerProcess("-m", ckpt, "--device", "cpu", "--dtype", "float32", "--temperature", "0")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert server.stop() == 0, server.log()


def ask(client, **kw):
    return client.chat.completions.create(model="m", messages=ASK, max_tokens=30, **kw)


def test_the_rigged_model_writes_the_call_as_text_without_tools(client):
    r = ask(client)
    assert r.choices[0].message.content == CALL and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls


def test_auto_tool_call_is_parsed_and_streamed(client):
    r = ask(client, tools=[FIND])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "find"
    assert json.loads(call.function.arguments) == {"q": 7}
    chunks = list(ask(client, tools=[FIND], stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no call text leaks
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "find" and deltas[0].index == 0
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"q": 7}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("kw", [{"tools": [OTHER]}, {"tools": [FIND], "tool_choice": "none"}])
def test_a_call_to_no_offered_tool_stays_text(client, kw):
    r = ask(client, **kw)
    assert r.choices[0].message.content == CALL and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, stream=True, **kw) if c.choices)
    assert streamed == CALL
