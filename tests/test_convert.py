"""Hugging Face import/export: tiny random Llama, Mistral and Qwen2 models built
locally (nothing is downloaded), compared logit for logit with transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_ext.convert import ConversionError, export_hf, forward_logits, import_hf  # noqa: E402
from megatron_ext.convert.__main__ import main  # noqa: E402
from megatron_ext.convert.hf_config import hf_config_from_train, rope_from_hf, train_config_from_hf  # noqa: E402
from megatron_ext.rope import RopeConfig  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-6)
ARCHS = {  # name -> (config class, model class, extra config, how the weights are saved)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sharded"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "bin"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, "single"),
}


def _hf_model(arch="llama", seed=0, **extra):
    config_cls, model_cls, arch_extra, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**SHAPE, **arch_extra, **extra}))
    with torch.no_grad():  # perturb every tensor (norms are ones, biases zeros at init) so each mapping matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _save(model, path, how="single"):
    if how == "bin":
        os.makedirs(path)
        model.config.save_pretrained(path)
        tied = model.config.tie_word_embeddings
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not tied}
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    else:
        model.save_pretrained(path, max_shard_size="40KB" if how == "sharded" else "5GB")
    return str(path)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_import_logits_and_export_roundtrip(arch, tmp_path):
    model = _hf_model(arch)
    src = _save(model, tmp_path / "hf", ARCHS[arch][3])
    assert (arch != "llama") or os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    import_hf(src, str(tmp_path / "ours"))
    assert (tmp_path / "ours" / "step-0" / "COMPLETE").exists() and (tmp_path / "ours" / "config.yaml").exists()
    ids = torch.randint(0, 512, (2, 37))  # odd length: forward_logits pads one token and drops it
    ref = _hf_logits(model, ids)
    ours = forward_logits(str(tmp_path / "ours"), ids)
    assert ours.shape == (2, 37, 512) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4

    export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
    original = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and arch == "qwen2")}
    exported = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert torch.equal(_hf_logits(again, ids), ref)


ROPE_KINDS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("kind", sorted(ROPE_KINDS))
def test_rope_scaling_beyond_the_original_length(kind, tmp_path):
    """max_position_embeddings 32; 95 tokens reach 3x past it (dynamic NTK rescales for 95, not the padded 96)."""
    model = _hf_model("llama", seed=1, max_position_embeddings=32, rope_scaling=dict(ROPE_KINDS[kind]))
    import_hf(_save(model, tmp_path / "hf"), str(tmp_path / "ours"))
    ids = torch.randint(0, 512, (1, 95))
    ours, ref = forward_logits(str(tmp_path / "ours"), ids), _hf_logits(model, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    plain = _hf_logits(_hf_model("llama", seed=1, max_position_embeddings=32), ids)
    assert (plain - ref).abs().max().item() > 1e-3  # the scaling changes these logits: the test can fail


@pytest.mark.parametrize("rope", [RopeConfig(base=1e4, scaling="linear", factor=4.0, original_max_position=64),
                                  RopeConfig(base=1e4, scaling="dynamic", factor=2.0, original_max_position=64),
                                  RopeConfig(base=1e4, scaling="yarn", factor=8.0, original_max_position=64),
                                  RopeConfig(base=5e5, scaling="llama3", factor=8.0, original_max_position=64)],
                         ids=lambda r: r.scaling)
def test_rope_config_survives_export_and_import(rope):
    cfg = train_config_from_hf({**SHAPE, "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 256}, "x")
    cfg.model.rope = rope
    hf = hf_config_from_train(cfg, 512, "float32")
    assert rope_from_hf(hf, "x") == rope


def test_abf_and_ntk_leave_as_their_base():
    cfg = train_config_from_hf({**SHAPE, "architectures": ["LlamaForCausalLM"]}, "x")
    cfg.data.seq_length = 200_000
    cfg.model.rope = RopeConfig(base=50000.0, scaling="abf", abf_base=5e6)
    hf = hf_config_from_train(cfg, 512, "float32")
    assert (hf["rope_theta"], hf["rope_scaling"], hf["max_position_embeddings"]) == (5e6, None, 200_000)
    cfg.model.rope = RopeConfig(base=1e4, scaling="ntk", factor=8.0)
    assert hf_config_from_train(cfg, 512, "float32")["rope_theta"] == pytest.approx(1e4 * 8.0 ** (16 / 14))


def test_unrepresentable_rope_and_window_are_errors_naming_them():
    base = {**SHAPE, "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096}
    with pytest.raises(ConversionError, match="'longrope'"):
        train_config_from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "cfg")
    with pytest.raises(ConversionError, match="attention factor"):
        yarn = {"rope_type": "yarn", "factor": 4.0, "attention_factor": 2.0}
        train_config_from_hf({**base, "rope_scaling": yarn}, "x")
    with pytest.raises(ConversionError, match="sliding_window=1024"):
        train_config_from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 1024}, "cfg")


def test_missing_layer_and_unexpected_tensor_one_error_exit_2(tmp_path, capsys):
    src = _save(_hf_model("llama"), tmp_path / "hf")
    path = os.path.join(src, "model.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("model.layers.1.")}
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, path)
    capsys.readouterr()  # drop transformers' progress bars
    assert main(["import-hf", "--hf-dir", src, "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.layers.1.self_attn.q_proj.weight" in err
    assert "unexpected ['model.layers.0.self_attn.extra.weight']" in err
    assert "model.norm.weight: found (63,), expected (64,)" in err
    assert not os.path.exists(tmp_path / "ours" / "step-0")


def test_pickled_code_in_bin_is_refused(tmp_path):
    src = _save(_hf_model("llama"), tmp_path / "hf")
    os.remove(os.path.join(src, "model.safetensors"))
    torch.save({"model.norm.weight": torch.ones(64), "payload": ConversionError("not a tensor")},
               os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(ConversionError, match="weights_only=True"):
        import_hf(src, str(tmp_path / "ours"))


def test_unknown_architecture_cli_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    run = subprocess.run([sys.executable, "-m", "megatron_ext.convert", "import-hf", "--hf-dir", str(tmp_path),
                          "--out", str(tmp_path / "ours")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "GPT2LMHeadModel" in run.stderr
    assert "LlamaForCausalLM" in run.stderr  # says what is supported



def _identical_documents(prefix, doc, copies):
    """An indexed dataset of ``copies`` copies of ``doc`` (megatron-core's own builder).
    With documents of seq_length tokens, every training sample is ``doc`` followed by
    doc[0], whatever the sample order: the first batch is known without the data code."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + "_text_document.bin", dtype=np.uint16)
    for _ in range(copies):
        builder.add_document(doc.numpy(), [len(doc)])
    builder.finalize(prefix + "_text_document.idx")
    return prefix


def test_train_from_imported_model_first_loss_equals_hf(tokenizer, sp, tmp_path):
    """Import, then 3 iterations at CP=2 x DP=2 on 4 processes from checkpoint.init_from: the
    first iteration's loss (before any update) is HF's loss on the same tokens."""
    model = _hf_model("llama", vocab_size=sp.vocab_size())
    out = str(tmp_path / "imported")
    import_hf(_save(model, tmp_path / "hf"), out)
    seq = 128
    doc = torch.randint(4, sp.vocab_size(), (seq,), generator=torch.Generator().manual_seed(3))  # no special ids
    prefix = _identical_documents(str(tmp_path / "same"), doc, 40)
    save_dir = str(tmp_path / "pretrain")
    sets = [f"data.blend=[1.0, {prefix}]", f"data.tokenizer_model={tokenizer}", f"checkpoint.save_dir={save_dir}",
            "parallel.context_parallel_size=2", f"data.seq_length={seq}", "optim.train_iters=3",
            "optim.global_batch_size=2", "checkpoint.save_interval=100", "logging.wandb=false", "precision=fp32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "megatron_ext.train", "--config", os.path.join(out, "config.yaml")]
    run = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialised weights from" in run.stdout + run.stderr
    records = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]
    first = [r for r in records if "loss" in r][0]["loss"]
    labels = torch.cat([doc[1:], doc[:1]])
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(model(doc[None]).logits[0].double(), labels).item()
    assert abs(first - hf_loss) <= 1e-4 * hf_loss, (first, hf_loss)


def test_logits_model_loads_once_and_equals_forward_logits(tmp_path, monkeypatch):
    """Dynamic NTK: 95 and 96 tokens share megatron-core's cached RoPE table length (96) but not
    the length they scale for, so a reused model must not reuse the table."""
    from megatron_ext.convert import LogitsModel, logits as logits_mod

    model = _hf_model("llama", seed=3, max_position_embeddings=32, rope_scaling=dict(ROPE_KINDS["dynamic"]))
    import_hf(_save(model, tmp_path / "hf"), str(tmp_path / "ours"))
    batches = [torch.randint(0, 512, (2, n)) for n in (95, 96, 40, 95)]
    expected = [forward_logits(str(tmp_path / "ours"), ids) for ids in batches]
    loads = []
    real = logits_mod.load_model_weights
    monkeypatch.setattr(logits_mod, "load_model_weights", lambda *a: (loads.append(a[0]), real(*a))[1])
    before = torch.random.get_rng_state()
    with LogitsModel.load(str(tmp_path / "ours")) as lm:
        assert torch.equal(torch.random.get_rng_state(), before)  # loading leaves the caller's RNG alone
        got = [lm.logits(ids) for ids in batches]
    assert len(loads) == 1
    for ids, ours, want in zip(batches, got, expected):
        assert ours.shape == (2, ids.shape[1], 512) and torch.equal(ours, want)
        fresh = _hf_model("llama", seed=3, max_position_embeddings=32, rope_scaling=dict(ROPE_KINDS["dynamic"]))
        assert (ours - _hf_logits(fresh, ids)).abs().max().item() <= 1e-4  # HF's dynamic RoPE keeps state: fresh
    with pytest.raises(RuntimeError, match="is closed"):
        lm.logits(batches[0])


def _end_after_three_tokens(model, ids, end):
    """Edit ``model`` so that ``end`` scores twice the third greedy token after ``ids`` [1, s]:
    greedy generation from ``ids`` stops there, or earlier."""
    with torch.no_grad():
        seq = ids
        for _ in range(3):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
        model.lm_head.weight[end] = 2 * model.lm_head.weight[int(seq[0, -1])]
    return model


def _chat_model_folder(path):
    """A tiny Llama 'instruct' folder built locally: byte-level BPE tokenizer.json, ChatML template
    in chat_template.jinja, eos = <|im_end|>, and weights edited so greedy generation ends its turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.conftest import CHATML, make_docs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(make_docs(60), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, f)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(CHATML)
    end, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    text = hf_tok.apply_chat_template([{"role": "user", "content": "Name the river."}], tokenize=False,
                                      add_generation_prompt=True)
    ids = hf_tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    model = _end_after_three_tokens(_hf_model("llama", seed=4, bos_token_id=None, eos_token_id=end, pad_token_id=pad),
                                    ids, end)
    model.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [end, pad], "pad_token_id": pad, "do_sample": False}, f)
    return path, ids, end


def test_export_keeps_tokenizer_chat_template_and_generation_stops(tmp_path, capsys):
    src, ids, end = _chat_model_folder(str(tmp_path / "instruct"))
    import_hf(src, str(tmp_path / "ours"))
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    assert "chat_template.jinja, config.json, generation_config.json" in capsys.readouterr().out
    back = str(tmp_path / "back")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert open(os.path.join(back, name), "rb").read() == open(os.path.join(src, name), "rb").read(), name
    msgs = [{"role": "user", "content": "Name the river."}]
    render = lambda d: transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=True)
    assert render(back) == render(src)
    config = json.load(open(os.path.join(back, "config.json")))
    original = json.load(open(os.path.join(src, "config.json")))
    assert config["eos_token_id"] == end and config["pad_token_id"] == original["pad_token_id"]
    runs = {}
    for name, folder in (("original", src), ("export", back)):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert model.generation_config.eos_token_id == [end, config["pad_token_id"]]
        with torch.no_grad():
            runs[name] = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert runs["export"] == runs["original"]
    assert runs["original"][-1] == end and len(runs["original"]) < 20  # it stopped at the end of its turn


def test_export_of_sentencepiece_tokenizer_writes_ids_and_generation_config(tokenizer, tmp_path):
    from data_tools.common import load_tokenizer

    from megatron_ext.convert import hf_files

    sp = load_tokenizer(tokenizer)
    ids = hf_files.token_ids(tokenizer, hf_files.tokenizer_source(tokenizer))
    assert ids == {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    written = hf_files.write_tokenizer_files(tokenizer, str(tmp_path), ids)
    assert written == ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert json.load(open(tmp_path / "generation_config.json")) == ids
    with pytest.raises(ConversionError, match="data.tokenizer_model 'hf:/nowhere' does not exist"):
        hf_files.tokenizer_source("hf:/nowhere")


SP_TEXTS = ["The river harbour.", "  two  spaces,  trailing ", "line one\nline two\n\nthree", "digits 12345 and 3.14",
            "unicode: café ü 北京 😀", "tab\there", "ﬁ ligature Ⅻ ＡＢＣ", " leading", "<s> and </s> as text", ""]


@pytest.mark.parametrize("split_digits", [False, True])
def test_sentencepiece_export_tokenizes_like_sentencepiece_and_stops_at_eos(split_digits, tmp_path, monkeypatch):
    """A checkpoint trained with a sentencepiece .model (BPE, digits split or not), exported:
    AutoTokenizer gives sentencepiece's ids (no bos added), decodes the same, has its
    unk/bos/eos/pad, and generate() stops at eos."""
    import dataclasses

    import sentencepiece as spm

    from data_tools.common import load_tokenizer
    from data_tools.tokenizer import train

    from megatron_ext.convert import api
    from tests.conftest import make_docs, write_jsonl

    numbers = [f"Version {i}.{i % 13}.{i * 31 % 97} of 2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}, key {i * 7919}"
               for i in range(1000)]
    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(200) + numbers)
    tokenizer = train([docs], 600, str(tmp_path / "tok"), split_digits=split_digits)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    pieces = [sp.id_to_piece(i).lstrip("\u2581") for i in range(sp.vocab_size())]
    assert any(len(p) > 1 and p.isdigit() for p in pieces) != split_digits  # multi-digit pieces only without

    model = _hf_model("llama", seed=5, vocab_size=sp.vocab_size(), bos_token_id=sp.bos_id(),
                      eos_token_id=sp.eos_id(), pad_token_id=sp.pad_id())
    prompt = torch.tensor([sp.encode("The river harbour")])
    model = _end_after_three_tokens(model, prompt, sp.eos_id())
    import_hf(_save(model, tmp_path / "hf"), str(tmp_path / "ours"))  # the HF folder has no tokenizer.json
    real = api.read_checkpoint  # the stored config then names the .model, as after training with it
    monkeypatch.setattr(api, "read_checkpoint", lambda path: (lambda cfg, *rest: (dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, tokenizer_model=tokenizer)), *rest))(*real(path)))
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = str(tmp_path / "back")
    hf_tok, ours = transformers.AutoTokenizer.from_pretrained(back), load_tokenizer(f"hf:{back}")
    for text in SP_TEXTS:
        ids = hf_tok(text).input_ids
        assert ids == sp.encode(text) == ours.encode(text), text  # our hf: reader of the export too
        assert hf_tok.decode(ids) == sp.decode(ids), text
    for name, i in (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
        assert (getattr(hf_tok, f"{name}_token_id"), getattr(hf_tok, f"{name}_token")) == (i, sp.id_to_piece(i))
    exported = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        got = exported.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.shape[1]:].tolist()
        want = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=sp.eos_id(),
                              pad_token_id=sp.pad_id())[0, prompt.shape[1]:].tolist()
    assert got == want and got[-1] == sp.eos_id() and len(got) < 20  # it stopped at eos, as the original
