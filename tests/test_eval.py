"""Needle/passkey evaluation: teacher-forced scoring against real step-by-step
greedy decoding, identical results at CP = 1, 2 and 4, resume, the heatmap,
and clear errors for bad requests."""
import argparse
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from megatron_ext.distributed import spawn_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 512  # the checkpoint's training length = its RoPE range


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("eval_ckpt") / "run"
    sets = ["parallel.context_parallel_size=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
            f"data.seq_length={SEQ}", "optim.global_batch_size=2", "optim.train_iters=6", "logging.wandb=false",
            f"data.blend=[1.0, {data['pre']}]", f"data.tokenizer_model={data['tok']}", f"checkpoint.save_dir={save}"]
    cmd = [sys.executable, "-m", "megatron_ext.train", "--config", os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")]
    res = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return str(save)


def needle(args, nproc=1, timeout=120):
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_ext.eval.needle"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend",
               "c10d", "--rdzv-endpoint", "localhost:0", "-m", "megatron_ext.eval.needle"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def cells(out):
    folder = os.path.join(out, "cells")
    return {name: json.load(open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# -- teacher-forced score == step-by-step greedy decoding -----------------------------------

def _force_copy(model, seed=0):
    """Attention and MLP outputs zeroed, embeddings random: the residual stream is the
    token's embedding, so (tied output weights) the argmax is the current token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for module in (layer.self_attention.linear_proj, layer.mlp.linear_fc2):
                for p in module.parameters():
                    p.zero_()
        emb = model.embedding.word_embeddings.weight
        emb.copy_(torch.randn(emb.shape, generator=gen))


def _greedy_agreement(rank, world, ckpt_dir, tok, forced):
    from data_tools.common import load_tokenizer
    from megatron_ext.eval.model import load_model, read_checkpoint
    from megatron_ext.eval.scoring import greedy_decode, score_answer

    model, _ = load_model(read_checkpoint(ckpt_dir), cp_size=1)
    if forced:
        _force_copy(model)
    sp = load_tokenizer(tok)
    prompts = [sp.encode(t) for t in ("What is the pass key? The pass key is", "The river harbour engine was old and",
                                      "Here we go. There and back again. " * 9, "the of and to in " * 20)]
    rows = []
    for prompt in prompts:
        greedy, logprobs = greedy_decode(model, prompt, 4)
        if forced:  # the forcing took: greedy repeats the last prompt token
            assert greedy == [prompt[-1]] * 4, (prompt[-1], greedy)
        answers = [greedy, [(t + 1) % 600 for t in greedy], sp.encode(" 12345")]
        answers += [greedy[:k] + [(greedy[k] + 7) % 600] + greedy[k + 1:] for k in range(1, 4)]
        for answer in answers:
            score = score_answer(model, prompt, answer)
            decoded = greedy_decode(model, prompt, len(answer))[0]  # real decoding, the answer's length
            first_wrong = next((k for k, (a, g) in enumerate(zip(answer, decoded)) if a != g), -1)
            rows.append({"score": (score.greedy_match, score.first_mismatch),
                         "decoding": (decoded == answer, first_wrong)})
        teacher = score_answer(model, prompt, greedy)
        assert teacher.argmax_tokens == greedy
        assert abs(teacher.mean_logprob - sum(logprobs) / 4) <= 1e-5, (teacher.mean_logprob, logprobs)
    return rows


@pytest.mark.parametrize("forced", [True, False], ids=["copy-forced", "trained"])
def test_teacher_forced_score_equals_greedy_decoding(ckpt, data, forced):
    rows = spawn_ranks(_greedy_agreement, 1, (ckpt, data["tok"], forced), timeout_s=60)[0]
    assert len(rows) == 24 and all(r["score"] == r["decoding"] for r in rows), rows
    verdicts = [r["score"][0] for r in rows]
    assert verdicts.count(True) >= 4 and verdicts.count(False) >= 16  # both verdicts occur


def _bf16_load(rank, world, ckpt_dir):
    import dataclasses

    from megatron_ext.eval.model import load_model, read_checkpoint

    info = read_checkpoint(ckpt_dir)
    fp32, bf16 = load_model(info, cp_size=1)
    ref = {k: v.clone() for k, v in fp32.state_dict().items() if torch.is_tensor(v)}
    model, on = load_model(dataclasses.replace(info, config=dataclasses.replace(info.config, precision="bf16")), 1)
    got = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return {"flags": (bf16, on, model.config.perform_initialization),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "equal": all(torch.equal(got[k], ref[k].to(got[k].dtype)) for k in ref), "keys": sorted(got) == sorted(ref)}


def test_bf16_eval_model_is_bf16_throughout_and_loads_every_weight(ckpt):
    """As training's Float16Module: norms in bf16 too; the weights are all the checkpoint's
    (the builder skips megatron-core's random init, so a weight the load missed would show)."""
    res = spawn_ranks(_bf16_load, 1, (ckpt,), timeout_s=60)[0]
    assert res["flags"] == (False, True, False)
    assert res["dtypes"] == ["torch.bfloat16"] and res["keys"] and res["equal"]


# -- the CLI: CP invariance, resume, figures -------------------------------------------------

def test_scores_identical_at_cp_1_2_4(ckpt, data, corpus, tmp_path):
    base = ["--checkpoint", ckpt, "--tokenizer-model", data["tok"], "--lengths", "128,320", "--depths", "0:100:50",
            "--kind", "needle", "--haystack", corpus]
    found = {}
    for cp in (1, 2, 4):
        res = needle(base + ["--out", tmp_path / f"cp{cp}"], nproc=cp)
        assert res.returncode == 0, res.stderr[-3000:]
        found[cp] = cells(tmp_path / f"cp{cp}")
    assert len(found[1]) == 6
    for cp in (2, 4):
        assert found[cp].keys() == found[1].keys()
        for name, one in found[1].items():
            other = found[cp][name]
            assert other["run"]["cp"] == cp and other["answer_tokens"] == one["answer_tokens"]
            assert other["score"] == one["score"] and other["argmax_tokens"] == one["argmax_tokens"], name
            assert abs(other["mean_logprob"] - one["mean_logprob"]) <= 1e-5, (name, cp)
    one = next(iter(found[1].values()))
    assert one["needle"].startswith("The special magic number is ") and one["answer"] in one["needle"]
    assert png_size(tmp_path / "cp2" / "heatmap.png") == (1000, 600)


def test_passkey_resume_skips_finished_cells(ckpt, data, tmp_path):
    out = tmp_path / "pk"
    base = ["--checkpoint", ckpt, "--tokenizer-model", data["tok"], "--depths", "0,100", "--kind", "passkey",
            "--out", out]
    assert needle(base + ["--lengths", "128"]).returncode == 0
    first = {name: os.stat(out / "cells" / name).st_mtime_ns for name in cells(out)}
    res = needle(base + ["--lengths", "128,256"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 cells, 2 already finished" in res.stdout and res.stdout.count("needle: length") == 2
    assert all(os.stat(out / "cells" / name).st_mtime_ns == t for name, t in first.items())
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("kind,length,depth") and len(summary) == 5
    table = (out / "passkey_accuracy.md").read_text()
    assert "| 128 | 2 |" in table and "| 256 | 2 |" in table
    for png in ("heatmap.png", "passkey_accuracy.png"):
        assert png_size(out / png) == (1000, 600)
    res = needle(base + ["--lengths", "128", "--seed", "1"])  # other settings: refuse to mix
    assert res.returncode == 2 and "computed with other settings" in res.stderr and "'seed': (0, 1)" in res.stderr


# -- bad requests ----------------------------------------------------------------------------

def _plan(**kw):
    from megatron_ext.eval.needle import build_parser, make_plan

    args = {"checkpoint": None, "tokenizer_model": None, "lengths": "256", "depths": "0:100:50", "out": "x",
            "kind": "passkey", "haystack": [], "cp": 0, "cp_comm_type": "p2p", "rope_scaling": "none",
            "rope_factor": 1.0, "seed": 0, "chat_template": False}
    args.update(kw)
    assert set(args) == {a.dest for a in build_parser()._actions if a.dest != "help"}
    return make_plan(argparse.Namespace(**args))


def test_bad_requests_get_clear_errors(ckpt, data, corpus, tmp_path):
    from data_tools.common import DataError
    from data_tools.tokenizer import train

    ok = {"checkpoint": ckpt, "tokenizer_model": data["tok"]}
    assert _plan(**ok).lengths == [256]
    with pytest.raises(ValueError, match=r"lengths \[2000\] exceed the model's RoPE range of 512 tokens.*--rope-scaling"):
        _plan(**ok, lengths="256,2k")
    assert _plan(**ok, lengths="2k", rope_scaling="yarn", rope_factor=4.0).rope.scaling == "yarn"
    with pytest.raises(ValueError, match="range of 1024 tokens.*extended by linear x2.0"):
        _plan(**ok, lengths="2k", rope_scaling="linear", rope_factor=2.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _plan(**{**ok, "checkpoint": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        _plan(**{**ok, "checkpoint": str(tmp_path)})
    other = train([corpus], 500, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="has 500 pieces but checkpoint .* has a vocabulary of 600"):
        _plan(**{**ok, "tokenizer_model": other})
    with pytest.raises(ValueError, match="--kind needle needs --haystack"):
        _plan(**ok, kind="needle")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 7}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: 'text' is not a string"):
        _plan(**ok, kind="needle", haystack=[str(bad)])
    with pytest.raises(ValueError, match="--cp 2 must equal the number of processes"):
        _plan(**ok, cp=2)
    with pytest.raises(ValueError, match="has no chat template; --chat-template needs hf:DIR"):
        _plan(**ok, chat_template=True)
    res = needle(["--checkpoint", ckpt, "--tokenizer-model", data["tok"], "--lengths", "4k", "--kind", "passkey",
                  "--out", tmp_path / "o"])
    assert res.returncode == 2 and "exceed the model's RoPE range" in res.stderr and not (tmp_path / "o").exists()


# -- hf: tokenizers: resume from any folder, chat template --------------------------------------

def _in(folder, args, timeout=120):
    return subprocess.run([sys.executable, "-m", "megatron_ext.eval.needle"] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout, cwd=folder)


def test_hf_tokenizer_resumes_from_another_folder_and_chat_template(ckpt, bpe_dir, tmp_path):
    """The settings hold hf:/absolute/DIR, so the same sweep run from another working directory
    (with another relative path to the same tokenizer) resumes instead of being refused."""
    one, two = tmp_path / "a", tmp_path / "a" / "b"
    two.mkdir(parents=True)
    out = tmp_path / "out"
    base = ["--checkpoint", ckpt, "--lengths", "128", "--depths", "0,100", "--kind", "passkey", "--out", out]
    res = _in(one, base + ["--tokenizer-model", "hf:" + os.path.relpath(bpe_dir, one)])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _in(two, base + ["--tokenizer-model", "hf:" + os.path.relpath(bpe_dir, two)])
    assert res.returncode == 0 and "2 cells, 2 already finished" in res.stdout, res.stderr[-3000:]
    stored = next(iter(cells(out).values()))
    assert stored["settings"]["tokenizer"] == f"hf:{os.path.abspath(bpe_dir)}"

    from data_tools.common import load_tokenizer

    tok = load_tokenizer(f"hf:{bpe_dir}")
    chat = tmp_path / "chat"
    res = _in(two, base[:-1] + [chat, "--tokenizer-model", f"hf:{bpe_dir}", "--chat-template"])
    assert res.returncode == 0, res.stderr[-3000:]
    for cell in cells(chat).values():
        assert len(cell["settings"]["chat_template"]) == 64  # its digest: another template will not resume
        answer = tok.encode("<|im_start|>assistant\n" + cell["answer"])[-len(cell["answer_tokens"]):]
        assert cell["answer_tokens"] == answer and cell["context_tokens"] <= 128 - 16
    res = _in(two, base + ["--tokenizer-model", f"hf:{bpe_dir}", "--chat-template"])  # plain cells live here
    assert res.returncode == 2 and "computed with other settings" in res.stderr and "chat_template" in res.stderr
