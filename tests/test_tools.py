"""Llama 4 tool calls parsed out of replies (pythonic and JSON forms); anything else stays text."""

import json

import pytest

from llama4_local.server.tools import might_be_tool_call, parse_tool_calls, required_schema


def calls(text, names=None):
    got = parse_tool_calls(text, names)
    return None if got is None else [(c.name, json.loads(c.arguments)) for c in got]


def test_pythonic_form():
    assert calls('[get_weather(city="Paris", days=3)]') == [("get_weather", {"city": "Paris", "days": 3})]
    two = "[a(x=[1, 2], y={\"k\": None}), b(flag=True, s='q')]"
    assert calls(two) == [("a", {"x": [1, 2], "y": {"k": None}}), ("b", {"flag": True, "s": "q"})]
    assert calls("[f(v=true, w=null)]") == [("f", {"v": True, "w": None})]  # JSON spellings too
    assert calls("<|python_start|>[f()]<|python_end|>") == [("f", {})]
    assert calls("  [f(a=-1.5)]\n") == [("f", {"a": -1.5})]


def test_json_forms():
    want = [("get_weather", {"city": "Oslo"})]
    assert calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}') == want
    assert calls('{"type": "function", "name": "get_weather", "arguments": {"city": "Oslo"}}') == want
    assert calls('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]') == want
    assert calls('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"n": 1}}') == [
        ("a", {}),
        ("b", {"n": 1}),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is sunny.",
        "[1, 2, 3]",
        "[f(1)]",  # positional arguments are not a call in this format
        "[f(a=x)]",  # a variable, not a literal
        "[f(a=__import__('os').system('id'))]",
        "[os.system(a=1)]",
        '{"name": "f", "parameters": "not json"}',
        '{"city": "Paris"}',
        "[f(a=1)] and some text",
        "",
    ],
)
def test_not_a_call_stays_text(text):
    assert parse_tool_calls(text) is None


def test_unknown_function_stays_text():
    assert calls("[f(a=1)]", {"g"}) is None
    assert calls("[f(a=1)]", {"f"}) == [("f", {"a": 1})]


def test_hold_back_only_what_may_be_a_call():
    assert might_be_tool_call("") and might_be_tool_call(" [get_") and might_be_tool_call("<|python_")
    assert might_be_tool_call('{"na') and not might_be_tool_call("Sure, ")


def test_required_schema_names_each_tool():
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    assert required_schema(tools)["items"]["anyOf"][1]["properties"]["name"] == {"const": "b"}
    assert required_schema(tools, "a")["items"]["properties"]["name"] == {"const": "a"}
