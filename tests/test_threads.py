"""`--threads`: how many CPU threads the computing commands use."""

import json

import torch

from llama4_local.threads import physical_cores, set_threads
from tests.cli_util import run_cli


def test_physical_cores_is_at_most_the_cpus_we_may_use():
    import os

    n = physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_set_threads_defaults_to_the_physical_cores():
    before = torch.get_num_threads()
    try:
        assert set_threads(None) == physical_cores() == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_prompt_with_one_thread_gives_the_same_tokens(scout_ckpt):
    args = ("prompt", "hello", "-m", scout_ckpt, "--json", "-n", "6", "--temperature", "0", "--dtype", "float32")
    one, default = run_cli(*args, "--threads", "1"), run_cli(*args)
    assert one.returncode == 0 and default.returncode == 0, one.stderr + default.stderr
    assert json.loads(one.stdout)["token_ids"] == json.loads(default.stdout)["token_ids"]
