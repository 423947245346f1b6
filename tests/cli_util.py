import json
import subprocess
import sys


def run_cli(*args, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def greedy_json(*args) -> dict:
    """`prompt` ARGS greedily, exactly (float32 on the CPU, past end tokens), as its --json object."""
    r = run_cli(
        "prompt", *args, "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--device", "cpu", "--json"
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines, less the one-time note of a kernel build (a fresh machine's first CLI run
    may be the one that builds it): a user error is exactly one of them, no blank line around it."""
    return [line for line in r.stderr.split("\n")[:-1] if not line.startswith("llama4-local: building")]
