"""PromptTokenizer: CLIP BPE ids equal transformers' CLIPTokenizer (test-only oracle) on a small vocabulary
written to a tmp dir; word-level vocabulary; save/from_file round trips; truncation; errors."""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest
from tiny_models import bytes_to_unicode

from ldm_rt.runtime.tokenizer import PromptTokenizer, TokenizerError

CORPUS = """
a photograph of an astronaut riding a horse on the moon, highly detailed, trending on artstation
a red cat sitting on the blue mat; the cat's tail is fluffy and it isn't sleeping
portrait of a woman with long hair in the style of a renaissance painting, oil on canvas, 4k
the quick brown fox jumps over the lazy dog while they're watching the sunset
"""

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Red CAT sitting on the blue mat",
    "   extra   spaces\tand\nnewlines   ",
    "punctuation!!! does it work?? (yes), [no]; {maybe}... 'quoted' \"double\"",
    "the cat's tail isn't fluffy, they're sure I'll see we'd they've",
    "numbers 1234 and 3.14159 and 2nd",
    "unicode: café naïve Ærøskøbing 東京 🐱🚀 e\u0301",
    "",
    "<|endoftext|> inside <|startoftext|> a prompt <|EndOfText|>!",
    "hyphen-ated, under_score, slash/ed, at@sign #hash $dollar 100%",
    "portrait of a woman " * 30,  # longer than 77 tokens
]


def learn_merges(corpus: str, count: int) -> list[tuple[str, str]]:
    """A plain BPE learner (Sennrich et al. 2016) over lowercase words with "</w>" on the last symbol."""
    words = collections.Counter(corpus.lower().replace(",", " ").replace(";", " ").split())
    segmented = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for w, symbols in segmented.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, symbols in segmented.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            segmented[w] = out
    return merges


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """vocab.json / merges.txt laid out as CLIP's: bytes, bytes + "</w>", merges, then the two specials."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    merges = learn_merges(CORPUS, 120)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder, vocab


def _oracle(folder, pad_token):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_ids_match_transformers(clip_files, pad_token):
    folder, vocab = clip_files
    ours = PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt", pad_token=pad_token)
    reference = _oracle(folder, pad_token)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    got = ours(PROMPTS)
    assert got.ids.dtype == np.int64 and got.ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(got.ids, expected)
    # The vocabulary is exercised: merges fire (fewer tokens than characters) and the pad is the asked one.
    assert (got.ids[0] != ours.pad_id).sum() < len(PROMPTS[0])
    assert ours.pad_id == vocab[pad_token] and ours.bos_id == vocab["<|startoftext|>"] and ours.eos_id == vocab["<|endoftext|>"]
    assert got.truncated == [False] * (len(PROMPTS) - 1) + [True]


def test_clip_matches_transformers_without_truncation(clip_files):
    # Compare the unpadded token sequences too, so a difference hidden by truncation would show.
    folder, _ = clip_files
    ours = PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt", max_length=400)
    reference = _oracle(folder, "<|endoftext|>")
    for prompt in PROMPTS:
        length = len(reference(prompt).input_ids)
        assert ours([prompt]).ids[0, :length].tolist() == reference(prompt).input_ids


def test_diffusers_folder_reads_pad_and_length(clip_files, tmp_path):
    from transformers import CLIPTokenizer

    folder, vocab = clip_files
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_text((folder / name).read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 20, "pad_token": "<|endoftext|>"}))
    # The pad token in both files, differently: special_tokens_map.json wins, in transformers as here.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    tok = PromptTokenizer.from_diffusers_folder(tmp_path)
    assert tok.max_length == 20 and tok.pad_id == vocab["!"] == 0
    reference = CLIPTokenizer.from_pretrained(tmp_path)
    expected = reference(PROMPTS, padding="max_length", max_length=reference.model_max_length, truncation=True).input_ids
    np.testing.assert_array_equal(tok(PROMPTS).ids, np.array(expected))
    ids = tok(["a cat"]).ids[0]
    assert ids[0] == tok.bos_id and ids[-1] == 0 and (ids == tok.eos_id).sum() == 1


def test_truncation_flag_and_warning(clip_files, caplog):
    folder, _ = clip_files
    tok = PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt", max_length=10)
    untruncated = PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt", max_length=200)
    long_prompt = "the quick brown fox jumps over the lazy dog while they're watching the sunset"
    n_tokens = untruncated([long_prompt]).ids[0].tolist().index(untruncated.eos_id) - 1  # without bos/eos
    with caplog.at_level(logging.WARNING, logger="ldm_rt.runtime.tokenizer"):
        out = tok([long_prompt, "a cat"])
    assert out.truncated == [True, False]
    assert out.dropped == [n_tokens - 8, 0]
    assert out.ids[0, -1] == tok.eos_id and out.ids[0, 0] == tok.bos_id
    np.testing.assert_array_equal(out.ids[0, :9], untruncated([long_prompt]).ids[0, :9])
    assert len(caplog.records) == 1 and f"{n_tokens - 8} token(s)" in caplog.records[0].getMessage()


def test_save_and_from_file_round_trip(clip_files, tmp_path):
    folder, _ = clip_files
    tok = PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt", pad_token="!")
    tok.save(tmp_path / "tokenizer.json")
    back = PromptTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (back.max_length, back.pad_id, back.bos_id, back.eos_id, back.vocab_size) == (
        tok.max_length, tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size)
    np.testing.assert_array_equal(back(PROMPTS).ids, tok(PROMPTS).ids)


def test_word_level_vocabulary_and_round_trip(tmp_path):
    words = ["a", "red", "green", "cat", "dog", "on", "the", "left", ","]
    tok = PromptTokenizer.word_level(words, max_length=8)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 4 + len(words))
    out = tok(["A RED cat, on THE", "a purple dog", "a red cat on the left on the left"])
    w = {word: i + 4 for i, word in enumerate(words)}
    assert out.ids[0].tolist() == [2, w["a"], w["red"], w["cat"], w[","], w["on"], w["the"], 3]
    assert out.ids[1].tolist() == [2, w["a"], 1, w["dog"], 3, 0, 0, 0]  # "purple" -> <|unk|>
    assert out.truncated == [False, False, True] and out.dropped[2] == 3
    tok.save(tmp_path / "tokenizer.json")
    back = PromptTokenizer.from_file(tmp_path / "tokenizer.json")
    np.testing.assert_array_equal(back(["a green dog on the left", "red"]).ids, tok(["a green dog on the left", "red"]).ids)
    assert back.max_length == 8 and back.pad_id == 0


def test_unknown_words_are_named_in_one_warning_per_prompt(clip_files, tmp_path, caplog):
    """A closed vocabulary reads unknown words as <|unk|>: the prompt then says less than the user wrote."""
    tok = PromptTokenizer.word_level(["a", "red", "cat", "on", "the"], max_length=16)
    tok.save(tmp_path / "tokenizer.json")
    tok = PromptTokenizer.from_file(tmp_path / "tokenizer.json")  # as the runtime loads it
    with caplog.at_level(logging.WARNING, logger="ldm_rt.runtime.tokenizer"):
        tok(["an Astronaut riding a red horse, astronaut!", "a red cat", "a red cat on the dog"])
        tok(["the purple cat"], what="negative prompt")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "prompt 0: the model does not know 'an', 'Astronaut', 'riding', 'horse', ',', '!' (read as unknown words)",
        "prompt 2: the model does not know 'dog' (read as unknown words)",
        "negative prompt 0: the model does not know 'purple' (read as unknown words)",
    ]
    caplog.clear()
    many = " ".join(f"w{k}" for k in range(12))
    with caplog.at_level(logging.WARNING, logger="ldm_rt.runtime.tokenizer"):
        tok([many])
    assert caplog.records[0].getMessage().endswith("'w9' and 2 more (read as unknown words)")
    caplog.clear()
    folder, _ = clip_files  # byte-level BPE spells every word: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="ldm_rt.runtime.tokenizer"):
        PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt")(["zxqv astronaut \u6771\u4eac <|endoftext|>"])
    assert caplog.records == []


def test_from_file_can_override_length(tmp_path):
    tok = PromptTokenizer.word_level(["a", "cat"], max_length=8)
    tok.save(tmp_path / "tokenizer.json")
    longer = PromptTokenizer.from_file(tmp_path / "tokenizer.json", max_length=12)
    assert longer(["a cat"]).ids.shape == (1, 12)


@pytest.mark.parametrize("words", [["Cat"], ["two words"], ["cat", "cat"], ["don't"]])
def test_word_level_rejects_bad_words(words):
    with pytest.raises(TokenizerError):
        PromptTokenizer.word_level(words, max_length=8)


def test_errors_name_the_file(tmp_path, clip_files):
    folder, _ = clip_files
    with pytest.raises(TokenizerError, match="does not exist"):
        PromptTokenizer.from_file(tmp_path / "missing.json")
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        PromptTokenizer.from_file(corrupt)
    (tmp_path / "vocab.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="vocab.json"):
        PromptTokenizer.from_clip_files(tmp_path / "vocab.json", folder / "merges.txt")
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="line 2"):
        PromptTokenizer.from_clip_files(folder / "vocab.json", bad_merges)
    with pytest.raises(TokenizerError, match="pad token"):
        PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt", pad_token="<|pad|>")
    # A transformers tokenizer.json fixes no padding: loading it needs max_length and pad_token.
    plain = tmp_path / "plain.json"
    PromptTokenizer.word_level(["a"], max_length=4).save(plain)
    data = json.loads(plain.read_text())
    data["padding"] = data["truncation"] = None
    plain.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="max_length"):
        PromptTokenizer.from_file(plain)
    assert PromptTokenizer.from_file(plain, max_length=6, pad_token="<|pad|>").max_length == 6
