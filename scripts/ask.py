"""Wait for a local vLLM server, then ask it one question through the official openai client.

With ``--dense-model-dir``, the full model answers the same question too (transformers, greedy,
on this machine's CPU), and the plan's perplexity ratio on held-out calibration text is
printed beside both answers (read from the score cache that ``vllm-miprun plan`` filled)."""

from __future__ import annotations

import argparse
import json
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


def dense_answer(model_dir: str, prompt: str, max_tokens: int) -> str:
    """The full model's greedy continuation of ``prompt`` (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def plan_quality(model_dir: str, plan_options: dict) -> tuple[float | None, int, int]:
    """(perplexity ratio on held-out calibration text, kept blocks, all blocks) of the plan."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    plan = make_plan(model_dir, MiprunOptions.from_dict(plan_options), progress=False, measure_quality=True)
    return plan.quality_ppl_ratio, len(plan.kept), plan.num_blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model", default="smollm2-pruned")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dense-model-dir", help="also ask the full model in this folder (transformers)")
    parser.add_argument("--plan-options", default="{}",
                        help="the served plan's options as JSON (e.g. {\"keep\": 0.75}), for its quality figure")
    args = parser.parse_args()
    dense = None
    if args.dense_model_dir:  # while the server starts
        dense = dense_answer(args.dense_model_dir, args.prompt, args.max_tokens)
        ratio, kept, total = plan_quality(args.dense_model_dir, json.loads(args.plan_options))
    wait_for_health(args.port, args.server_pid, args.log, args.timeout)
    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    reply = client.completions.create(model=args.model, prompt=args.prompt, max_tokens=args.max_tokens,
                                      temperature=0)
    print(f"models served: {models}")
    print(f"prompt: {args.prompt!r}")
    if dense is None:
        print(f"answer: {reply.choices[0].text!r}")
    else:
        print(f"dense answer  ({total} blocks, transformers): {dense!r}")
        print(f"pruned answer ({kept} blocks, vLLM):         {reply.choices[0].text!r}")
        shown = "not measured" if ratio is None else f"x{ratio:.3f} the dense model's"
        print(f"perplexity on held-out calibration text: {shown}")
    with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/metrics", timeout=5) as response:
        lines = [ln for ln in response.read().decode().splitlines() if ln.startswith("miprun_")]
    print("pruning metrics:\n  " + "\n  ".join(lines) if lines else "pruning metrics: none exported")


if __name__ == "__main__":
    main()
