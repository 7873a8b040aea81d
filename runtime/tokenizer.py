"""Prompt -> token ids for the text encoder, with the `tokenizers` library only (no torch, no transformers).

Two vocabularies:
- CLIP's byte-level BPE (Radford et al. 2021; Sennrich et al. 2016) as Stable Diffusion uses it, built
  exactly like transformers' CLIPTokenizer so the ids are identical: NFC + whitespace squeeze +
  lowercase, CLIP's split regex, byte-level alphabet, "</w>" end-of-word suffix, <|startoftext|> ...
  <|endoftext|>, padded to 77 with <|endoftext|> (SD v1) or "!" (SD v2).
- a word-level vocabulary for the small text encoder trained jointly with a UNet (`word_level`).

Every tokenizer pads and truncates to a fixed `max_length`: the text encoder's position table is that
long and exported graphs take (B, max_length). All settings live in the `tokenizers.Tokenizer`, so
`save` writes one self-contained tokenizer.json that `from_file` restores unchanged.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordLevel

from .atomic import atomic_write_text
from .files import FileFormatError, read_json_object

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# The word-level vocabulary's own specials; CLIP has no pad or unk token of its own.
PAD = "<|pad|>"
UNK = "<|unk|>"
CLIP_MAX_LENGTH = 77
# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py), as transformers' CLIPTokenizer has it.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Unknown words named in a warning; the rest are counted.
MAX_WORDS_SHOWN = 10
# transformers writes this placeholder for "no limit" into tokenizer_config.json.
UNSET_MODEL_MAX_LENGTH = 10**12
# vocab.json and tokenizer_config.json: CLIP's vocabulary is 1.6 MB; room for multilingual ones (20-35 MB).
MAX_TOKENIZER_JSON_BYTES = 64 << 20
# Textual-inversion tokens (PromptTokenizer.with_added_tokens) are characters of Unicode's plane 15 private-use area.
PRIVATE_USE = 0xF0000


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class TokenizedPrompts:
    ids: np.ndarray  # (B, max_length) int64: bos, tokens, eos, then pad (each prompt's first chunk)
    truncated: list[bool]  # per prompt: tokens beyond max_length (x chunks) were dropped
    dropped: list[int]  # per prompt: how many tokens were dropped
    # Per prompt, (n, max_length): its first n <= `chunks` pieces of max_length - 2 tokens, each with its own bos,
    # eos and pad (tokenizers' overflowing pieces); an empty prompt has one.
    chunks: tuple[np.ndarray, ...] = ()
    # Per prompt, (n, max_length) float32: each token's weight in its chunks (runtime/prompt_weights.py); empty: all 1.
    weights: tuple[np.ndarray, ...] = ()


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{what} {path} does not exist; pass the path of an existing file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {what} {path} ({e}); check the file") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return read_json_object(path, limit=MAX_TOKENIZER_JSON_BYTES, what=what, fix="re-download or re-export it")
    except FileFormatError as e:
        raise TokenizerError(f"{what}: {e}") from None


def _read_optional_json(path: Path, what: str) -> dict[str, Any]:
    return _read_json(path, what) if path.is_file() else {}


def _tokenizer_from_str(text: str, where: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for every kind of bad file
        raise TokenizerError(f"{where} is not a valid tokenizer.json ({e}); re-export the model") from None


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _find_bos_eos(tokenizer: Tokenizer) -> tuple[int, int]:
    """bos and eos ids from the post-processor, which is what actually inserts them."""
    processor = json.loads(tokenizer.to_str()).get("post_processor") or {}
    candidates = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for p in candidates:
        if p.get("type") == "RobertaProcessing":
            return int(p["cls"][1]), int(p["sep"][1])
        if p.get("type") == "TemplateProcessing":
            single = p["single"]
            first, last = single[0].get("SpecialToken"), single[-1].get("SpecialToken")
            if first and last:
                return int(p["special_tokens"][first["id"]]["ids"][0]), int(p["special_tokens"][last["id"]]["ids"][0])
    raise TokenizerError(
        "the tokenizer's post-processor does not add a start and an end token; build it with "
        "PromptTokenizer.from_clip_files or PromptTokenizer.word_level"
    )


class PromptTokenizer:
    """Fixed-length tokenisation of a batch of prompts: ids (B, max_length) = bos, tokens, eos, pad..."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """`tokenizer` must already pad and truncate to one fixed length and add bos/eos (the
        constructors below set that up); everything else is read from it."""
        padding, truncation = tokenizer.padding, tokenizer.truncation
        if not padding or padding.get("length") is None or not truncation:
            raise TokenizerError("the tokenizer does not pad and truncate to a fixed length; pass max_length when loading it")
        if truncation["max_length"] != padding["length"]:
            raise TokenizerError(
                f"the tokenizer truncates to {truncation['max_length']} but pads to {padding['length']}; pass max_length to make them agree"
            )
        self._tokenizer = tokenizer
        self._bos_id, self._eos_id = _find_bos_eos(tokenizer)
        # Only a closed word vocabulary loses words; byte-level BPE spells any text (its "unk" is never emitted).
        self._unk_id = tokenizer.token_to_id(UNK) if isinstance(tokenizer.model, WordLevel) else None

    @property
    def max_length(self) -> int:
        return int(self._tokenizer.padding["length"])

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return int(self._tokenizer.padding["pad_id"])

    def __call__(self, prompts: str | Sequence[str], what: str = "prompt", warn: bool = True, chunks: int = 1) -> TokenizedPrompts:
        """Ids for each prompt, up to `chunks` pieces of it (TokenizedPrompts.chunks). Logs one warning per prompt
        that is truncated and one per prompt with words a word-level vocabulary does not have (the text encoder
        reads each as <|unk|>); `what` names the prompts in those warnings ("prompt", "negative prompt");
        `warn=False`: none (another tokenizer of the same prompts has said it: SDXL's second)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self._tokenizer.encode_batch(list(prompts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), self.max_length)
        # With stride 0 the overflowing pieces hold exactly the tokens beyond the first piece, each piece with its own
        # specials and pad: the chunks A1111 and compel encode one by one.
        def words(piece: Any) -> int:
            return sum(1 for s, a in zip(piece.special_tokens_mask, piece.attention_mask) if a and not s)

        pieces = [[e, *(o for o in e.overflowing if words(o))] for e in encodings]
        kept = tuple(np.array([p.ids for p in ps[:chunks]], dtype=np.int64).reshape(-1, self.max_length) for ps in pieces)
        dropped = [sum(words(p) for p in ps[chunks:]) for ps in pieces]
        for i, n in enumerate(dropped):
            if n and warn:
                warn_dropped(what, i, n, prompts[i], self.max_length, chunks)
        if warn:
            self.warn_unknown(prompts, what, encodings)
        return TokenizedPrompts(ids=ids, truncated=[n > 0 for n in dropped], dropped=dropped, chunks=kept)

    def warn_unknown(self, prompts: Sequence[str], what: str = "prompt", encodings: Sequence[Any] | None = None) -> None:
        """One warning per prompt with words a word-level vocabulary does not have (`encodings`: the prompts' own,
        if the caller has them); none for byte-level BPE, which spells anything."""
        if self._unk_id is None:
            return
        warned: set[str] = set()
        for i, e in enumerate(encodings if encodings is not None else self._tokenizer.encode_batch(list(prompts))):
            unknown = unknown_words(prompts[i], e, self._unk_id)
            if unknown and prompts[i] not in warned:  # a negative prompt repeated per prompt warns once
                warned.add(prompts[i])
                shown = ", ".join(map(repr, unknown[:MAX_WORDS_SHOWN]))
                more = f" and {len(unknown) - MAX_WORDS_SHOWN} more" if len(unknown) > MAX_WORDS_SHOWN else ""
                log.warning("%s %d: the model does not know %s%s (read as unknown words)", what, i, shown, more)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids alone: no bos, eos, padding or truncation (pieces of a prompt that the caller puts
        together: runtime/prompt_weights.py)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        # Truncation stays on (the tokenizer is shared): the overflowing pieces hold the rest, in order, padded.
        return [[t for piece in (e, *e.overflowing) for t, a in zip(piece.ids, piece.attention_mask) if a] for e in encodings]

    def token_id(self, token: str) -> int | None:
        """The id of `token` (a vocabulary entry or an added token), None if it is neither."""
        return self._tokenizer.token_to_id(token)

    def with_added_tokens(self, words: Sequence[tuple[str, int]]) -> tuple[PromptTokenizer, list[list[int]]]:
        """A copy in which each (word, n) of `words` reads as n new tokens, and their ids (after the vocabulary, in
        order): textual inversion (runtime/embeddings.py). The word is found wherever it appears in a normalised
        prompt (for CLIP: case-insensitively, inside other words too), as transformers' added tokens are, and becomes
        all n tokens, as diffusers' maybe_convert_prompt makes it. All of it lives in the tokenizer.json `to_str`
        writes, which the native runtime reads too: each new token is one private-use character (U+F0000 on, never
        produced by a prompt), and a literal Replace normalizer after the model's own turns the word into them
        (longest words first, so a word inside another does not split it)."""
        tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
        own = tokenizer.normalizer
        next_id = tokenizer.get_vocab_size(with_added_tokens=True)
        next_char = PRIVATE_USE + sum(1 for t in tokenizer.get_added_tokens_decoder().values() if len(t.content) == 1 and ord(t.content) >= PRIVATE_USE)
        ids: list[list[int]] = []
        replaces: dict[str, str] = {}  # normalised word -> its tokens' characters
        for word, n in words:
            key = own.normalize_str(word) if own is not None else word
            if not key or key in replaces:
                raise TokenizerError(f"{word!r} is empty or another word's twin to this tokenizer (it normalises to {key!r}); pick another")
            ids.append(list(range(next_id, next_id + n)))
            replaces[key] = "".join(chr(next_char + k) for k in range(n))
            next_id, next_char = next_id + n, next_char + n
        tokenizer.add_tokens([AddedToken(c, normalized=True) for chars in replaces.values() for c in chars])
        steps = [own] if own is not None else []
        steps += [normalizers.Replace(key, replaces[key]) for key in sorted(replaces, key=len, reverse=True)]
        tokenizer.normalizer = normalizers.Sequence(steps)
        out = PromptTokenizer(tokenizer)
        if [out.token_id(c) for chars in replaces.values() for c in chars] != [i for group in ids for i in group]:
            raise TokenizerError("the tokenizer numbered the added tokens out of order; report this with the model's tokenizer.json")
        return out, ids

    def to_str(self) -> str:
        """The self-contained tokenizer.json text (vocabulary, padding, truncation, bos/eos template)."""
        return self._tokenizer.to_str(pretty=True)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_str())

    # ---- constructors ----

    @classmethod
    def from_file(cls, path: str | Path, max_length: int | None = None, pad_token: str | None = None) -> PromptTokenizer:
        """A tokenizer.json: ours (self-contained), or a transformers one together with max_length and
        pad_token where it does not fix them itself."""
        path = Path(path)
        tokenizer = _tokenizer_from_str(_read_text(path, "tokenizer file"), str(path))
        if max_length is not None or pad_token is not None:
            length = max_length or (tokenizer.padding or {}).get("length")
            pad = pad_token or (tokenizer.padding or {}).get("pad_token")
            if length is None or pad is None:
                raise TokenizerError(f"{path} fixes no padding; pass both max_length and pad_token")
            _pad_and_truncate(tokenizer, int(length), pad, where=str(path))
        return cls(tokenizer)

    @classmethod
    def from_str(cls, text: str, where: str = "tokenizer text") -> PromptTokenizer:
        """The inverse of to_str."""
        return cls(_tokenizer_from_str(text, where))

    @classmethod
    def from_clip_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        max_length: int = CLIP_MAX_LENGTH,
        pad_token: str = EOS,
    ) -> PromptTokenizer:
        """CLIP's BPE from vocab.json and merges.txt, configured as transformers' CLIPTokenizer."""
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        vocab = _read_json(vocab_json, "CLIP vocabulary")  # a JSON object, token -> id
        merges = _parse_merges(merges_txt)
        for token, role in ((BOS, "start token"), (EOS, "end token"), (pad_token, "pad token")):
            if token not in vocab:
                raise TokenizerError(f"CLIP vocabulary {vocab_json} lacks the {role} {token!r}; pass a token it has or re-download vocab.json")
        try:
            model = BPE(
                vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
                fuse_unk=False, unk_token=EOS,
            )
        except Exception as e:  # tokenizers raises a bare Exception for inconsistent vocab/merges
            raise TokenizerError(f"{vocab_json} and {merges_txt} do not form a BPE model ({e}); use files from the same tokenizer") from None
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        # As in transformers, the special tokens (the pad token too) are matched in the prompt text first:
        # a literal "<|endoftext|>" stays one token, and with SD v2's pad "!" every "!" becomes id 0.
        tokenizer.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
        )
        _pad_and_truncate(tokenizer, max_length, pad_token, where=str(vocab_json))
        return cls(tokenizer)

    @classmethod
    def from_diffusers_folder(cls, tokenizer_dir: str | Path) -> PromptTokenizer:
        """A diffusers `tokenizer/` folder: vocab.json + merges.txt, with the pad token and length from
        special_tokens_map.json / tokenizer_config.json (SD v1 pads with <|endoftext|>, SD v2 with "!")."""
        folder = Path(tokenizer_dir)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist; pass the model's tokenizer/ folder")
        config = _read_optional_json(folder / "tokenizer_config.json", "tokenizer config")
        special = _read_optional_json(folder / "special_tokens_map.json", "special tokens map")
        pad_token = _token_content(special.get("pad_token")) or _token_content(config.get("pad_token")) or EOS
        max_length = int(config.get("model_max_length") or CLIP_MAX_LENGTH)
        if max_length >= UNSET_MODEL_MAX_LENGTH:
            max_length = CLIP_MAX_LENGTH
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            return cls.from_clip_files(folder / "vocab.json", folder / "merges.txt", max_length, pad_token)
        return cls.from_file(folder / "tokenizer.json", max_length=max_length, pad_token=pad_token)

    @classmethod
    def word_level(cls, words: Sequence[str], max_length: int) -> PromptTokenizer:
        """A closed word vocabulary for a small jointly trained text encoder.

        Ids: 0 <|pad|>, 1 <|unk|>, 2 <|startoftext|>, 3 <|endoftext|>, then `words` in order. Prompts are
        lowercased and split at whitespace and punctuation (each punctuation mark is its own token, so
        list "," if commas should be seen); unknown words become <|unk|>. Padding uses <|pad|>, not
        <|endoftext|>, so the encoder can tell the end of a prompt from filler.
        """
        specials = [PAD, UNK, BOS, EOS]
        vocab = {token: i for i, token in enumerate(specials)}
        vocab.update({w: i + len(specials) for i, w in enumerate(words)})
        tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
        bad = [w for w in words if _word_pieces(tokenizer, w) != [w]]
        if bad:
            raise TokenizerError(f"word_level: {bad[:10]} are not single lowercase words or punctuation marks; split or lowercase them")
        duplicates = sorted({w for w, n in Counter(words).items() if n > 1} | (set(words) & set(specials)))
        if duplicates:
            raise TokenizerError(f"word_level: {duplicates[:10]} appear more than once (or clash with a special token); remove them")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
        )
        _pad_and_truncate(tokenizer, max_length, PAD, where="word_level")
        return cls(tokenizer)


def warn_dropped(what: str, index: int, dropped: int, prompt: str, max_length: int, chunks: int) -> None:
    """The warning for `prompt` (number `index` of its list) losing `dropped` tokens beyond `chunks` chunks."""
    room = f"the text encoder's {max_length}" if chunks == 1 else f"{chunks} chunks of the text encoder's {max_length}"
    hint = "; artifacts built with --prompt-chunks N take longer prompts" if chunks == 1 else ""
    log.warning("%s %d was truncated: %d token(s) beyond %s were dropped (%.40r...)%s", what, index, dropped, room, prompt, hint)


def unknown_words(prompt: str, encoding: Any, unk_id: int) -> list[str]:
    """The distinct words of `prompt` (as written) that `encoding` holds as the unknown token, in order."""
    words = [
        prompt[start:end]
        for token, special, (start, end) in zip(encoding.ids, encoding.special_tokens_mask, encoding.offsets)
        if token == unk_id and not special
    ]
    first: dict[str, str] = {}
    for word in words:
        first.setdefault(word.lower(), word)  # the vocabulary is lowercase: one entry per word, as first written
    return list(first.values())


def _word_pieces(tokenizer: Tokenizer, word: str) -> list[str]:
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(word))]


def _pad_and_truncate(tokenizer: Tokenizer, max_length: int, pad_token: str, where: str) -> None:
    if max_length < 3:
        raise TokenizerError(f"{where}: max_length {max_length} leaves no room between start and end tokens; use >= 3")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise TokenizerError(f"{where}: pad token {pad_token!r} is not in the vocabulary; pass a token it has")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)


def _parse_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(_read_text(path, "BPE merges file").splitlines(), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"BPE merges file {path}, line {number}: expected two symbols, got {line!r}; re-download merges.txt")
        merges.append((parts[0], parts[1]))
    return merges
