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
