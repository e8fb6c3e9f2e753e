"""What a review of the GPU path found (session 10), checked on CPU: a gloo process on a GPU node
computes on the CPU (CPU patches, device, RNG), the final norm follows the TE choice rather than
what is installed, and the CUDA-only guards (flash head dim, backend vs tensor device, RoPE
angles moved to x's device) refuse or adapt before any kernel runs."""
import os

import pytest
import torch

from megatron_ext.distributed import spawn_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")


def _cpu_rank_on_a_gpu_node(rank, world):
    """A gloo rank in a process that believes CUDA exists (as on a GPU node, where resharding
    and conversion still run on gloo ranks): the CPU patches apply, the model builds and runs
    on the CPU, and the process then refuses CUDA work."""
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    from megatron_ext.convert.runtime import build_fp32_model
    from megatron_ext.megatron.cpu import enable_cpu_runtime
    from megatron_ext.train.checkpoint_state import rng_states, set_rng_states
    from megatron_ext.train.config import load_config
    from megatron_ext.train.model import default_device, init_model_parallel

    cfg = load_config(TINY, ["data.seq_length=16", "parallel.context_parallel_size=1",
                             "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"])
    init_model_parallel(cfg)
    model = build_fp32_model(cfg, 64)  # megatron-core's rotary moved inv_freq to "cuda" here before
    ids = torch.randint(0, 64, (1, 16))
    logits = model(ids, torch.arange(16)[None], None)
    try:
        enable_cpu_runtime("cuda")
        refused = ""
    except RuntimeError as err:
        refused = str(err)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states, sentinel = rng_states(), {"saved-elsewhere": torch.zeros(3, dtype=torch.uint8)}
    set_rng_states({**states, "device": "cuda", "tracker": sentinel})  # saved on a GPU: tracker left alone
    kept = sorted(get_cuda_rng_tracker().get_states())
    set_rng_states({**states, "tracker": sentinel})  # same device type: restored
    from megatron_ext.sysinfo import peak_rss_bytes
    from megatron_ext.train.metrics import peak_memory_bytes

    torch.cuda.max_memory_allocated = lambda *a, **k: -1  # the GPU's allocator is not this rank's memory
    return {"peak": (peak_memory_bytes(), peak_rss_bytes()), "init": model.config.perform_initialization, "device": str(default_device()), "logits": (str(logits.device), tuple(logits.shape)),
            "refused": refused, "rng_device": states["device"], "kept": kept,
            "before": sorted(states["tracker"]), "restored": sorted(get_cuda_rng_tracker().get_states())}


def test_gloo_rank_on_a_gpu_node_computes_on_the_cpu():
    (res,) = spawn_ranks(_cpu_rank_on_a_gpu_node, 1, timeout_s=120)
    assert res["device"] == "cpu" and res["rng_device"] == "cpu"
    assert res["logits"] == ("cpu", (1, 16, 64))
    assert "CPU patches" in res["refused"] and "fresh process" in res["refused"]
    assert res["kept"] == res["before"] != ["saved-elsewhere"] and res["restored"] == ["saved-elsewhere"]
    assert 0 < res["peak"][0] <= res["peak"][1]  # the metrics line reports this process's RSS, not the GPU's
    assert res["init"] is False  # conversion overwrites every weight: no random init of a 70B model first


def test_current_cuda_device_selects_and_restores_the_gpu(monkeypatch):
    """A "cuda:N" conversion or LogitsModel allocates on GPU N: megatron-core (and its rotary
    inv_freq) use torch.cuda.current_device(), so it is set for the block and restored."""
    from megatron_ext.distributed import current_cuda_device

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d if isinstance(d, int) else torch.device(d).index))
    with current_cuda_device("cuda:1"):
        assert calls == [1]
    assert calls == [1, 0]
    for plain in ("cuda", "cpu", torch.device("cpu")):
        with current_cuda_device(plain):
            pass
    assert calls == [1, 0]


def test_final_norm_follows_the_te_choice_not_what_is_installed(monkeypatch):
    import megatron.core.transformer.transformer_block as tb
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.megatron.norm import SequenceParallelNorm
    from megatron_ext.megatron.specs import get_gpt_block_cp_spec, get_gpt_layer_cp_spec

    class ApexLikeNorm:  # what LayerNormImpl is when apex imports: it refuses RMSNorm
        pass

    monkeypatch.setattr(tb, "LayerNormImpl", ApexLikeNorm)
    monkeypatch.setattr(tb, "get_num_layers_to_build", lambda *args, **kw: 2)  # no parallel_state here
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, normalization="RMSNorm")
    block = get_gpt_block_cp_spec(config, get_gpt_layer_cp_spec(normalization="RMSNorm"))
    assert block.layer_norm is SequenceParallelNorm and len(block.layer_specs) == 2


def test_flash_kernel_refuses_head_dims_it_cannot_take():
    from megatron_ext.attention.blocks import CudaFlashKernel

    q = torch.zeros(1, 8, 2, 12, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"head dim 12 .*multiple of 8 up to 256"):
        CudaFlashKernel.forward(q, q, q, True, 1.0)
    q = torch.zeros(1, 8, 2, 264, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim 264"):
        CudaFlashKernel.forward(q, q, q, True, 1.0)


def test_rope_angles_follow_x_to_its_device():
    from megatron_ext.rope import RopeConfig, apply_rope

    x = torch.zeros(1, 8, 2, 16, device="meta")  # positions stay on the host, as sharding.position_ids gives them
    out = apply_rope(x, torch.arange(8), RopeConfig())
    assert out.device.type == "meta" and out.shape == x.shape


def _exchange_with_wrong_device(rank, world):
    import torch.distributed as dist

    from megatron_ext.attention.comm import RingComm, all_gather_into

    t = torch.zeros(4, device="meta")
    errors = []
    for call in (lambda: RingComm(None).exchange([t], [t], 0), lambda: all_gather_into(t, t, dist.group.WORLD)):
        try:
            call()
        except ValueError as err:
            errors.append(str(err))
    return errors


def test_exchanges_refuse_tensors_the_backend_cannot_carry():
    (errors,) = spawn_ranks(_exchange_with_wrong_device, 1, timeout_s=60)
    assert len(errors) == 2 and all("gloo group got a meta tensor [4]" in e and "needs cpu" in e for e in errors)


def test_validate_names_sequence_parallel_and_vocabulary_splits():
    from megatron_ext.train.config import load_config, validate

    sp = ["parallel.tensor_model_parallel_size=4", "parallel.context_parallel_size=1", "model.num_query_groups=4"]
    with pytest.raises(ValueError, match=r"sequence parallelism splits a CP rank's 130 tokens .* TP = 4"):
        validate(load_config(TINY, sp + ["data.seq_length=130"]), 4)
    validate(load_config(TINY, sp + ["data.seq_length=130", "parallel.sequence_parallel=false"]), 4)
    base = ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2"]
    with pytest.raises(ValueError, match=r"model.vocab_size gives 32001 .*tensor_model_parallel_size 2.*: 32256"):
        validate(load_config(TINY, base + ["model.vocab_size=32001"]), 4)
    validate(load_config(TINY, base + ["model.vocab_size=32256"]), 4)


def _vote_worker(rank, world):
    from megatron_ext.distributed import LaggedVote

    vote = LaggedVote()
    seen = []
    for raised in ([False, True], [False, False], [True, True]):
        vote.post(raised[rank])
        seen.append(vote.read())
    return seen, vote.host.device.type


def test_lagged_vote_agrees_on_any_raised_flag():
    """The stop check between micro-batches (no host sync on CUDA: the read waits only for the
    vote's own copy); on gloo the same calls agree over the world."""
    out = spawn_ranks(_vote_worker, 2, timeout_s=60)
    assert out == [([True, False, True], "cpu")] * 2, out
