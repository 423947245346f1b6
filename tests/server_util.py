"""A real `llama4-local serve` process on 127.0.0.1 for tests, and a checkpoint that can call tools."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

# A Llama 4 style template that renders tools: their JSON schemas in the system turn, the
# assistant's calls in the pythonic form, and tool results as ipython turns.
TOOL_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if system_message or tools %}
    {{- "<|header_start|>system<|header_end|>\\n\\n" + system_message }}
    {%- if tools %}
        {{- "Tools: call them as [name(arg=value)].\\n" }}
        {%- for t in tools %}{{- t | tojson }}{{- "\\n" }}{%- endfor %}
    {%- endif %}
    {{- "<|eot|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {{- "<|header_start|>ipython<|header_end|>\\n\\n" + message.content + "<|eot|>" }}
    {%- elif message.tool_calls is defined and message.tool_calls %}
        {{- "<|header_start|>assistant<|header_end|>\\n\\n[" }}
        {%- for call in message.tool_calls %}
            {{- call.function.name + "(" }}
            {%- for name in call.function.arguments %}
                {{- name + "=" + call.function.arguments[name] | tojson }}{% if not loop.last %}, {% endif %}
            {%- endfor %}
            {{- ")" }}{% if not loop.last %}, {% endif %}
        {%- endfor %}
        {{- "]<|eom|>" }}
    {%- else %}
        {{- '<|header_start|>' + message.role + '<|header_end|>\\n\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for part in message.content %}
                {%- if part.type == 'image' %}{{- '<|image|>' }}
                {%- elif part.type == 'text' %}{{- part.text }}{%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}
"""


def server_checkpoint(src: Path, out: Path, chunk: int = 64) -> Path:
    """A copy of `src` whose template renders tools, with chunks long enough for a conversation."""
    shutil.copytree(src, out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    (cfg.get("text_config") or cfg)["attention_chunk_size"] = chunk
    cfg_path.write_text(json.dumps(cfg, indent=1))
    tcfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text())
    tcfg["chat_template"] = TOOL_TEMPLATE
    tcfg_path.write_text(json.dumps(tcfg, indent=1))
    return out


class ServerProcess:
    """`llama4-local serve ARGS --port 0` in a child process; its log lines are collected."""

    def __init__(self, *args, timeout: float = 120):
        cmd = [sys.executable, "-m", "cli", "serve", *map(str, args), "--port", "0"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.time() + timeout
        self.url = None
        while time.time() < deadline and self.url is None:
            for line in list(self.lines):
                m = re.search(r"listening on (http://\S+?) ", line)
                if m:
                    self.url = m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            time.sleep(0.05)
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def bigram_checkpoint(src: Path, out: Path, chain: list[int]) -> Path:
    """A copy of `src` rigged to write `chain` after its prompt, whatever the prompt says.

    Every attention output and MLP/expert down projection is zeroed, so the last hidden state
    is the input token's embedding: the model is a bigram table. Each chain token gets its own
    unit embedding, and the lm_head row of its successor reads it; chain[0] follows any token
    outside the chain (the prompt's last). The chain's tokens must be distinct.
    """
    import torch
    from safetensors.torch import load_file, save_file

    assert len(set(chain)) == len(chain)
    server_checkpoint(src, out)
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(path)
        for name, t in tensors.items():
            if "o_proj" in name or "down_proj" in name:
                tensors[name] = torch.zeros_like(t)
            elif name.endswith("language_model.model.norm.weight") or name == "model.norm.weight":
                tensors[name] = torch.ones_like(t)
            elif name.endswith("embed_tokens.weight"):
                e = torch.zeros_like(t)
                e[:, len(chain)] = 1.0  # every other token: the direction that leads into the chain
                for i, tok in enumerate(chain):
                    e[tok] = 0.0
                    e[tok, i] = 1.0
                tensors[name] = e
            elif name.endswith("lm_head.weight"):
                w = torch.zeros_like(t)
                w[chain[0], len(chain)] = 10.0
                for i in range(len(chain) - 1):
                    w[chain[i + 1], i] = 10.0
                tensors[name] = w
        save_file(tensors, str(path), metadata={"format": "pt"})
    return out
