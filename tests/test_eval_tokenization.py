"""The suffix rule (data_tools.segments): an answer's tokens are exactly the tokens the
whole text gives after the prompt, for sentencepiece and for byte-level BPE; the
evaluation's cells, and a chat template's assistant turn."""
import pytest

from data_tools.common import load_tokenizer
from data_tools.segments import common_prefix, encode_pair, encode_segments, implied_separator
from megatron_ext.eval.needle import ANSWER_BUDGET, cell_prompt

PAIRS = [("What is the pass key? The pass key is", "51252"),  # the separator is implied: one space
         ("Question: which river?\nAnswer:", "The harbour"),
         ("The river harbour engine was old and ", "lantern"),  # ends in a space: it merges into the answer
         ("Say the word: lant", "ern engine"),  # mid-word: the last prompt token merges
         ("Line one.\n", " leading space kept")]


@pytest.fixture(params=["sentencepiece", "byte-level-bpe"])
def tok(request, tokenizer, bpe_dir):
    return load_tokenizer(tokenizer if request.param == "sentencepiece" else f"hf:{bpe_dir}")


def _perfect_copier(full_ids):
    """A scorer whose argmax at each position is the next token of the whole text, as a model
    that has learnt to copy the needle predicts it."""
    return lambda prompt_ids, n: [full_ids[len(prompt_ids) - 1 + j + 1] for j in range(n)]


@pytest.mark.parametrize("prompt,answer", PAIRS)
def test_scored_tokens_are_the_whole_texts_suffix(tok, prompt, answer):
    full = tok.encode(prompt + implied_separator(prompt, answer) + answer)
    p, a = encode_pair(tok, prompt, answer)
    assert p + a == full and p and a
    assert len(p) == common_prefix(full, tok.encode(prompt))  # the rule's cut: longest common prefix
    assert tok.decode(a).strip() == answer.strip()


def test_a_merged_last_prompt_token_is_scored_with_the_answer(bpe_dir):
    tok = load_tokenizer(f"hf:{bpe_dir}")
    prompt, answer = "The river harbour engine was old and ", "lantern"
    alone, full = tok.encode(prompt), tok.encode(prompt + answer)
    assert full[:len(alone)] != alone  # the trailing space merged into ' lantern'
    p, a = encode_pair(tok, prompt, answer)
    assert p == alone[:-1] and p + a == full and tok.decode(a) == " lantern"


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_byte_level_answer_was_scored_wrong_and_now_right(kind, bpe_dir, corpus):
    """The bug of issue #25: the answer encoded on its own ('51252') is not what follows
    the prompt (' 51252'), so a model that copies perfectly scored 0 in every cell."""
    from data_tools.synth.needle import read_haystack

    tok = load_tokenizer(f"hf:{bpe_dir}")
    haystack = read_haystack([corpus]) if kind == "needle" else ""
    for length, depth in [(256, 0.0), (256, 50.0), (512, 100.0)]:
        cell = cell_prompt(haystack, kind, 0, tok, length, depth)
        sample = cell["sample"]
        full = tok.encode(sample["prompt"] + " " + sample["response"])
        copier = _perfect_copier(full)
        old_answer = tok.encode(sample["response"])  # what main scored against
        old_prompt = tok.encode(sample["prompt"])
        assert copier(old_prompt, len(old_answer)) != old_answer  # scored wrong on main
        assert copier(cell["prompt_ids"], len(cell["answer_ids"])) == cell["answer_ids"]  # scored right now
        assert cell["prompt_ids"] + cell["answer_ids"] == full
        assert len(full) <= length and len(cell["prompt_ids"]) <= length - ANSWER_BUDGET
        assert tok.decode(cell["answer_ids"][:1]).startswith(" ")  # the word-start space is the answer's


def test_sentencepiece_cells_keep_their_tokens(tokenizer, corpus):
    """sentencepiece put its word-start marker on the answer by itself: the rule changes nothing there."""
    from data_tools.synth.needle import read_haystack

    tok = load_tokenizer(tokenizer)
    for kind, haystack in (("passkey", ""), ("needle", read_haystack([corpus]))):
        for depth in (0.0, 50.0, 100.0):
            cell = cell_prompt(haystack, kind, 0, tok, 300, depth)
            assert cell["prompt_ids"] == tok.encode(cell["sample"]["prompt"])
            assert cell["answer_ids"] == tok.encode(cell["sample"]["response"])


def test_chat_template_answer_starts_after_the_assistant_turn(bpe_dir, tokenizer):
    tok = load_tokenizer(f"hf:{bpe_dir}")
    cell = cell_prompt("", "passkey", 0, tok, 256, 50.0, chat=True)
    rendered = tok.chat_prompt(cell["sample"]["prompt"])
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    full = tok.encode(rendered + cell["sample"]["response"])  # the template's newline is the separator
    assert cell["prompt_ids"] + cell["answer_ids"] == full and len(full) <= 256
    assert cell["prompt_ids"][-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    assert tok.decode(cell["answer_ids"]) == cell["sample"]["response"]
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tokenizer).chat_prompt("x")


def test_segments_mask_flips_at_the_suffix_cuts(tok):
    segs = [("user: ", False), ("Say one word.\n", False), ("assistant: ", False), ("Lantern.\n", True),
            ("user: ", False), ("And again?\n", False), ("assistant: ", False), ("Lantern harbour.\n", True)]
    ids, flags = encode_segments(tok, segs)
    text = "".join(t for t, _ in segs)
    assert ids == tok.encode(text) and len(flags) == len(ids)
    first = flags.index(1)
    assert first == common_prefix(ids, tok.encode("user: Say one word.\nassistant: "))
    trained = [i for i, f in zip(ids, flags) if f]
    assert "".join(tok.decode(trained).split()) == "Lantern.Lanternharbour."  # sentencepiece drops the newlines


def test_common_prefix_at_every_place_around_slice_edges():
    import random

    rng = random.Random(0)
    for _ in range(300):
        n, step = rng.randrange(0, 40), rng.randrange(1, 9)
        a = [rng.randrange(3) for _ in range(n)]
        b = a[:rng.randrange(0, n + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b, step) == common_prefix(tuple(a), b, step) == want, (a, b, step)
