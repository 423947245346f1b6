"""Llama 4's tool calls, parsed out of a reply into OpenAI's `tool_calls`.

Two forms: the pythonic one the Llama 4 templates ask for, `[get_weather(city="Paris"), ...]`,
and the JSON one, `{"name": "get_weather", "parameters": {"city": "Paris"}}` (or a list of such,
or several separated by semicolons), either optionally between <|python_start|> and
<|python_end|>. Anything else, or a call to a function the request did not offer, stays text.
"""

from __future__ import annotations

import ast
import json
import secrets
from dataclasses import dataclass

_JSON_NAMES = {"true": True, "false": False, "null": None}


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = "call_" + secrets.token_hex(12)

    def as_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _literal(node: ast.AST):
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    return ast.literal_eval(node)


def _pythonic(text: str) -> list[ToolCall] | None:
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
        if len(args) != len(node.keywords):
            return None
        calls.append(ToolCall(node.func.id, json.dumps(args, ensure_ascii=False)))
    return calls


def _json_call(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict) or set(obj) - {"name", "parameters", "arguments", "type"}:
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json(text: str) -> list[ToolCall] | None:
    if not text.startswith(("{", "[")):
        return None
    try:
        objs = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            objs = [json.loads(part) for part in text.split(";") if part.strip()]
        except json.JSONDecodeError:
            return None
    if len(objs) == 1 and isinstance(objs[0], list):
        objs = objs[0]
    calls = [_json_call(o) for o in objs]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str, names: set[str] | None = None) -> list[ToolCall] | None:
    """The calls `text` makes, or None when it is not (only) well-formed tool calls."""
    body = text.strip()
    if body.startswith("<|python_start|>"):
        body = body[len("<|python_start|>") :].removesuffix("<|python_end|>").strip()
    calls = _json(body) if body.startswith("{") else _pythonic(body) or _json(body)
    if not calls or (names is not None and any(c.name not in names for c in calls)):
        return None
    return calls


def might_be_tool_call(text: str) -> bool:
    """Whether a reply that starts with `text` could turn out to be a tool call (so hold it back)."""
    body = text.lstrip()
    if not body:
        return True
    return body.startswith(("[", "{", "<|python_start|>")) or "<|python_start|>".startswith(body)


def required_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON form of one or more calls (to `name` alone, if given), for tool_choice required/named."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is None or fn["name"] == name:
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": fn["name"]}, "parameters": params},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
            )
    item = options[0] if len(options) == 1 else {"anyOf": options}
    return {"type": "array", "items": item, "minItems": 1}
