"""Wait for a local vLLM server, then ask it one question through the official openai client."""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request

from openai import OpenAI


def wait_for_health(port: int, pid: int, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"the server exited during start-up; its log:\n{open(log).read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"the server did not become healthy in {timeout:.0f} s; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model", default="smollm2-pruned")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    wait_for_health(args.port, args.server_pid, args.log, args.timeout)
    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    reply = client.completions.create(model=args.model, prompt=args.prompt, max_tokens=16, temperature=0)
    print(f"models served: {models}")
    print(f"prompt: {args.prompt!r}")
    print(f"answer: {reply.choices[0].text!r}")
    with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/metrics", timeout=5) as response:
        lines = [ln for ln in response.read().decode().splitlines() if ln.startswith("miprun_")]
    print("pruning metrics:\n  " + "\n  ".join(lines) if lines else "pruning metrics: none exported")


if __name__ == "__main__":
    main()
