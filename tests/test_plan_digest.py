"""The plan digest: a short hash of kept blocks, method and score cache, carried in the
config to every process; a config or a set of ranks holding two plans refuses to load."""

from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp

from vllm_miprun.options import MiprunOptions, OptionError
from vllm_miprun.pipeline.plan import (DIGEST_FIELD, DIGEST_SOURCE_FIELD, check_digest, digest_fields,
                                       make_plan, plan_digest)


def test_digest_names_kept_blocks_method_and_scores():
    base = plan_digest([0, 1, 3], 4, "mi-prun", "abc")
    assert len(base) == 12 and int(base, 16) >= 0
    assert base == plan_digest((0, 1, 3), 4, "mi-prun", "abc")
    others = {plan_digest([0, 1, 2], 4, "mi-prun", "abc"), plan_digest([0, 1, 3], 5, "mi-prun", "abc"),
              plan_digest([0, 1, 3], 4, "sleb", "abc"), plan_digest([0, 1, 3], 4, "mi-prun", "abd")}
    assert base not in others and len(others) == 4


def test_plan_carries_its_digest_into_the_config(tiny_llama_dir):
    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict({"keep": 0.75, "method": "last"}))
    fields = digest_fields(plan)
    assert fields[DIGEST_FIELD] == plan.digest == plan.to_json()["digest"]
    check_digest(plan.kept, plan.num_blocks, fields[DIGEST_FIELD], fields[DIGEST_SOURCE_FIELD])
    other = [b for b in range(plan.num_blocks) if b not in plan.kept][:1] + list(plan.kept[1:])
    with pytest.raises(OptionError, match=f"carries plan digest {plan.digest}"):
        check_digest(other, plan.num_blocks, fields[DIGEST_FIELD], fields[DIGEST_SOURCE_FIELD])


def _rank(rank: int, port: int, digests: list[str], results) -> None:
    import torch.distributed as dist

    from vllm_miprun.vllm.ranks import RankPlanError, check_ranks_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        check_ranks_agree([0, 1, 3], digests[rank], dist.group.WORLD)
        results.put((rank, "ok"))
    except RankPlanError as err:
        results.put((rank, str(err)))
    dist.barrier()  # both ranks have answered before either leaves
    results.close()
    results.join_thread()  # the answer is in the pipe, then leave past torch's gloo teardown,
    os._exit(0)  # which aborts now and then ("terminate called ...", see test_worker_plan)


@pytest.mark.parametrize("digests, refused", [
    (["0123456789ab", "0123456789ab"], False),
    (["0123456789ab", "fedcba987654"], True),
])
def test_ranks_with_different_plans_refuse_to_load(digests, refused):
    """Two real ranks (gloo), as two torchrun ranks that each planned."""
    from vllm_miprun.tools.harness import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank, args=(rank, port, digests, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    answers = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    for rank in range(2):
        if refused:
            assert "hold different miprun plans" in answers[rank]
            assert all(f"plan digest {digest}" in answers[rank] for digest in digests)
        else:
            assert answers[rank] == "ok"


def test_nixl_refuses_a_prefill_decode_pair_that_kept_other_blocks(tiny_llama_dir):
    """Two instances that kept different 6-block sets of one model: NIXL's compatibility hash
    (what its handshake compares, looked up where NIXL's worker calls it) differs once the
    loader's fold is in; the same plan hashes alike; an unpruned model keeps vLLM's hash."""
    import vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker as nixl_worker
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import compute_nixl_compatibility_hash
    from vllm.engine.arg_utils import EngineArgs

    def nixl_hash(extra: dict | None) -> str:
        load = {"load_format": "miprun", "model_loader_extra_config": extra} if extra else {}
        config = EngineArgs(model=str(tiny_llama_dir), enforce_eager=True, **load).create_engine_config()
        return nixl_worker.compute_nixl_compatibility_hash(config, "CPU_ATTN")

    from vllm.config.load import LoadConfig

    from vllm_miprun.vllm.loader import MiprunModelLoader

    for _ in range(2):  # the worker builds the loader after its KV connector; the fold goes in once
        MiprunModelLoader(LoadConfig(load_format="miprun", model_loader_extra_config={"keep": 0.75}))
    last, first = nixl_hash({"drop": [4, 5]}), nixl_hash({"drop": [0, 1]})
    assert last != first, "NIXL would exchange KV between two different 6-block models"
    assert nixl_hash({"drop": [4, 5]}) == last
    dense_config = EngineArgs(model=str(tiny_llama_dir), enforce_eager=True).create_engine_config()
    assert nixl_hash(None) == compute_nixl_compatibility_hash(dense_config, "CPU_ATTN")


def test_the_nixl_fold_goes_in_once_however_often_it_is_installed(monkeypatch):
    """A worker may build the loader more than once; folding the digest twice would give one
    plan two hashes (an instance that folded once could not pair with one that folded twice)."""
    import sys
    import types

    from vllm_miprun.vllm import kv_transfer

    module = types.ModuleType(kv_transfer.NIXL_WORKER_MODULE)
    module.compute_nixl_compatibility_hash = lambda vllm_config, backend: f"vllm:{backend}"
    monkeypatch.setitem(sys.modules, kv_transfer.NIXL_WORKER_MODULE, module)
    for _ in range(3):
        kv_transfer.cover_plan_in_nixl_hash()

    def config(digest):
        hf_config = types.SimpleNamespace(**({DIGEST_FIELD: digest} if digest else {}))
        return types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=hf_config))

    assert module.compute_nixl_compatibility_hash(config("abc"), "CPU_ATTN") == kv_transfer.hash_with_plan(
        "vllm:CPU_ATTN", "abc")
    assert module.compute_nixl_compatibility_hash(config(None), "CPU_ATTN") == "vllm:CPU_ATTN"


def test_the_loader_checks_the_digest_against_the_full_model_block_count(tiny_llama_dir):
    """The config a worker gets says the kept blocks and the full model's count (L, not K):
    the digest is checked against those, so a consistent config loads and a mixed one is refused."""
    from types import SimpleNamespace

    from vllm_miprun.model import remap
    from vllm_miprun.vllm.loader import check_config_digest

    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict({"keep": 0.75, "method": "last"}))
    fields = {**remap.pruned_fields(tiny_llama_dir, _config(tiny_llama_dir), plan.kept), **digest_fields(plan)}
    assert fields["miprun_num_blocks_full"] == plan.num_blocks == 8
    assert check_config_digest(SimpleNamespace(**fields)) == plan.digest
    mixed = {**fields, "miprun_kept_layers": [0, 1, 2, 3, 4, 6]}
    with pytest.raises(OptionError, match="carries plan digest"):
        check_config_digest(SimpleNamespace(**mixed))


def _config(model_dir):
    from vllm_miprun.model.checkpoint import read_config

    return read_config(model_dir)


def test_plan_report_lists_kept_and_pruned_blocks(tiny_llama_dir):
    from vllm_miprun.vllm.loader import plan_report

    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict({"keep": 0.5, "method": "last"}))
    report = plan_report(plan, 1.23456)
    assert report["kept"] == list(plan.kept) and len(plan.kept) == 4
    assert report["pruned"] == [b for b in range(8) if b not in plan.kept]
    assert report["plan_seconds"] == 1.235 and report["digest"] == plan.digest
