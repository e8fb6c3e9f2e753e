"""Shared fixtures: a small corpus of generated English-like text and a
sentencepiece tokenizer trained on it (nothing is downloaded)."""
import json
import os
import random
import subprocess
import sys

import pytest

# spawn_ranks' ranks fork from one server that imported torch and megatron-core once, instead of
# each rank importing them again (about 5 s a rank on 2 cores; see megatron_ext/distributed.py).
os.environ.setdefault("MEGATRON_EXT_START_METHOD", "forkserver")
os.environ.setdefault("MEGATRON_EXT_FORKSERVER_PRELOAD", "torch,megatron.core")

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had "
         "not but have they one their all there would when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might "
         "us great old year off come since against go came right used take three river harbour engine lantern").split()


def make_docs(n, seed=0, min_sentences=3, max_sentences=40):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(min_sentences, max_sentences)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        docs.append(" ".join(sentences) + ("\n" if rng.random() < 0.3 else ""))
    return docs


def write_jsonl(path, docs, key="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_jsonl(root / "docs.jsonl", make_docs(300))


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory):
    from data_tools.tokenizer import train

    return train([corpus], 600, str(tmp_path_factory.mktemp("tok") / "tok"))


@pytest.fixture(scope="session")
def sp(tokenizer):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer)


@pytest.fixture(scope="session")
def data(corpus, tokenizer, tmp_path_factory):
    """Pretraining binaries, SynL SFT binaries (with loss masks) and the tokenizer."""
    root = tmp_path_factory.mktemp("train_data")
    py = [sys.executable, "-m"]
    subprocess.run(py + ["data_tools.preprocess", "--input", corpus, "--output-prefix", str(root / "pre"),
                         "--tokenizer-model", tokenizer, "--append-eod"], check=True, capture_output=True)
    subprocess.run(py + ["data_tools.synth", "synl", "--output", str(root / "synl.jsonl"), "--num-samples", "40",
                         "--target-tokens", "400", "--tokenizer-model", tokenizer], check=True, capture_output=True)
    subprocess.run(py + ["data_tools.preprocess", "--input", str(root / "synl.jsonl"), "--output-prefix",
                         str(root / "sft"), "--tokenizer-model", tokenizer, "--sft"], check=True, capture_output=True)
    return {"pre": str(root / "pre"), "sft": str(root / "sft"), "tok": tokenizer}


@pytest.fixture(scope="session")
def two_iterations(data, tmp_path_factory):
    """Save dir of one plain run: 2 ranks (CP=2), 2 iterations, no recompute, the final checkpoint.
    tests/test_train.py, test_train_core.py and test_recompute.py each launched this same run; read only."""
    from tests.test_train import train_spawned

    save = str(tmp_path_factory.mktemp("two_iterations") / "run")
    res = train_spawned(data, save, nproc=2, extra=["optim.train_iters=2"])
    assert res.returncode == 0, res.stderr[-2000:]
    return save


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def bpe_dir(corpus, tmp_path_factory):
    """hf:DIR of a byte-level BPE tokenizer.json (GPT-2/Llama-3/Qwen2 style: ByteLevel pre-tokenizer
    and decoder), trained locally on the test corpus plus passkey-style lines so numbers get
    ' 51252'-style pieces; ChatML chat template; 600 ids, the size of the sentencepiece fixture."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=560, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(5)
    numbers = [f"The pass key is {rng.randrange(10000, 100000)}. Remember it." for _ in range(300)]
    texts = [json.loads(line)["text"] for line in open(corpus)] + numbers * 3
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True)
                            for i in range(600 - tok.get_vocab_size(with_added_tokens=True))])
    assert tok.get_vocab_size(with_added_tokens=True) == 600
    root = tmp_path_factory.mktemp("bpe")
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "chat_template": CHATML}))
    return str(root)
