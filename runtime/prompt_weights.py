"""Prompt weighting in AUTOMATIC1111's syntax: `a (red:1.3) car, [blurry]` (opt-in: `--prompt-weighting`).

The syntax (A1111's `prompt_parser.parse_prompt_attention`, re-implemented here):
- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3;
  nested brackets multiply (`((text))`: 1.21); a bracket left open is closed at the end of the prompt; a closing
  bracket that closes nothing is text.
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the characters themselves; any other backslash is dropped (as A1111).
- `BREAK` (capitals, a word of its own) ends the current chunk of max_length - 2 tokens: what follows starts the next.
- A chunk that fills up within COMMA_BACKTRACK tokens after a comma ends at that comma instead: the words after it
  move to the next chunk whole (A1111's `comma_padding_backtrack`, 20 by default), with or without brackets.

Encoding (A1111's `sd_hijack_clip`): each run of equally weighted text is tokenised alone, the token ids are put
together with one weight per token, split into chunks of max_length - 2 tokens, each with its own bos, eos and pad
(weight 1; the chunks of runtime/tokenizer.py's `chunks=`, so a prompt without brackets gives its usual ids, except
where a long prompt's chunk ends at a comma as above),
and each chunk's hidden states are weighted after the text encoder (`emphasize`): z *= w per token, then z is
rescaled so that its mean over (tokens, channels) is what it was before weighting (A1111's "Original" emphasis).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np

from .params import GenerationError
from .tokenizer import PromptTokenizer, TokenizedPrompts, warn_dropped

log = logging.getLogger(__name__)

ROUND = 1.1  # (text); [text] divides by it
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: how far back a full chunk looks for a comma
# One lexeme per match: an escaped character, a lone backslash, a bracket, ":WEIGHT)" (closes a round bracket with
# that weight), a run of plain text, or a colon that closes nothing. The weight's pattern is A1111's: a match that is
# not a number ("1.2.3") is refused, not read as text.
_LEXEMES = re.compile(
    r"""
      \\[()\[\]\\]
    | \\
    | [()\[\]]
    | :\s*([+-]?[.\d]+)\s*\)
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Fragment = tuple[str, float]  # text and its weight


def parse_prompt_weights(prompt: str) -> list[list[Fragment]]:
    """The prompt's weighted text, as segments separated by BREAK (one segment without it); within a segment, runs
    of equal weight are merged. An empty prompt is [[("", 1.0)]].

    >>> parse_prompt_weights("an (important) word")
    [[('an ', 1.0), ('important', 1.1), (' word', 1.0)]]
    """
    pieces: list[list] = []  # [text, weight]; weight None: a BREAK
    open_round: list[int] = []  # where each open bracket's text starts in `pieces`
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _LEXEMES.finditer(prompt):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            pieces.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            open_round.append(len(pieces))
        elif lexeme == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), _number(weight, match.group(0)))
        elif lexeme == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif lexeme == "]" and open_square:
            scale(open_square.pop(), 1 / ROUND)
        else:
            for k, text in enumerate(_BREAK.split(lexeme)):
                if k:
                    pieces.append(["", None])
                pieces.append([text, 1.0])
    for start in open_round:  # left open: closed at the end, round before square (A1111's order of rounding)
        scale(start, ROUND)
    for start in open_square:
        scale(start, 1 / ROUND)

    segments: list[list[Fragment]] = [[]]
    for text, weight in pieces:
        if weight is None:
            segments.append([])
        elif segments[-1] and segments[-1][-1][1] == weight:
            segments[-1][-1] = (segments[-1][-1][0] + text, weight)
        else:
            segments[-1].append((text, weight))
    return [segment or [("", 1.0)] for segment in segments]


def _number(text: str, lexeme: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise GenerationError(
            f"prompt weight {lexeme!r} is not a number; write (text:1.2), or \\( \\) for literal brackets"
        ) from None


def tokenize(
    tokenizer: PromptTokenizer, prompts: str | Sequence[str], what: str = "prompt", warn: bool = True, chunks: int = 1
) -> TokenizedPrompts:
    """`tokenizer(prompts, what, warn, chunks)` for weighted prompts: the same ids, chunks and warnings, and
    TokenizedPrompts.weights, one weight per token of each chunk (bos, eos and pad: 1)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    parsed = [parse_prompt_weights(prompt) for prompt in prompts]
    texts = [text for segments in parsed for segment in segments for text, _ in segment]
    token_ids = iter(tokenizer.token_ids(texts))  # one call for every fragment of every prompt
    size, length = tokenizer.max_length - 2, tokenizer.max_length
    comma = tokenizer.token_ids([","])[0]
    comma_id = comma[0] if len(comma) == 1 else None  # a vocabulary without a comma token never backtracks
    kept_ids, kept_weights, dropped = [], [], []
    for i, segments in enumerate(parsed):
        pieces: list[list[tuple[int, float]]] = []  # chunks of (token, weight), each at most `size` long
        for segment in segments:
            pieces.append([])  # BREAK: a new chunk, even if the one before is not full (A1111)
            last_comma = -1  # where the current chunk's last comma is
            for _, weight in segment:
                for token in next(token_ids):
                    if token == comma_id:
                        last_comma = len(pieces[-1])
                    elif len(pieces[-1]) == size and last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK:
                        pieces[-1], moved = pieces[-1][: last_comma + 1], pieces[-1][last_comma + 1 :]
                        pieces.append(moved)
                        last_comma = -1
                    if len(pieces[-1]) == size:
                        pieces.append([])
                        last_comma = -1
                    pieces[-1].append((token, weight))
        if len(pieces) > 1 and not pieces[-1]:
            pieces.pop()  # a BREAK at the end starts nothing
        ids = np.full((len(pieces), length), tokenizer.pad_id, np.int64)  # (n, L): bos, tokens, eos, pad...
        weights = np.ones((len(pieces), length), np.float32)
        for k, piece in enumerate(pieces):
            ids[k, 0], ids[k, len(piece) + 1] = tokenizer.bos_id, tokenizer.eos_id
            if piece:
                ids[k, 1 : len(piece) + 1], weights[k, 1 : len(piece) + 1] = zip(*piece)
        kept_ids.append(ids[:chunks])
        kept_weights.append(weights[:chunks])
        dropped.append(sum(len(piece) for piece in pieces[chunks:]))
        if dropped[-1] and warn:
            warn_dropped(what, i, dropped[-1], prompts[i], length, chunks)
    if warn:  # the words as written, without the syntax
        tokenizer.warn_unknown([" ".join("".join(t for t, _ in s) for s in segments) for segments in parsed], what)
    return TokenizedPrompts(
        ids=np.array([c[0] for c in kept_ids], np.int64).reshape(-1, length), truncated=[n > 0 for n in dropped], dropped=dropped,
        chunks=tuple(kept_ids), weights=tuple(kept_weights),
    )  # fmt: skip


def emphasize(states: np.ndarray, weights: Sequence[np.ndarray], batch: int = 1) -> np.ndarray:
    """A1111's emphasis of a text encoder's hidden states `states` (rows, n x L, D): row r holds prompt r // batch,
    whose chunks' weights are weights[r // batch] (n_r <= n, L; chunks past n_r, the empty prompt's padding: 1).
    Each chunk of each row: z *= w[:, None], then z *= mean(z before) / mean(z after) over (L, D). A1111 takes that
    mean over the whole batch of one encoder call, which is one prompt (repeated) there; here it is each row's own,
    so prompts batched together do not change each other's images."""
    rows, tokens, dim = states.shape
    length = weights[0].shape[1]
    n = tokens // length
    w = np.ones((len(weights), n, length), np.float32)
    for r, chunk_weights in enumerate(weights):
        w[r, : len(chunk_weights)] = chunk_weights
    if np.all(w == 1.0):
        return states
    w = np.repeat(w, batch, axis=0)  # (rows, n, L)
    z = states.reshape(rows, n, length, dim)
    weighted = z * w[..., None]
    before = z.mean(axis=(2, 3), dtype=np.float64)  # (rows, n)
    after = weighted.mean(axis=(2, 3), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = (weighted * (before / after)[..., None, None]).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise GenerationError("the prompt weights cancel or overflow the text encoding (its mean becomes 0 or infinite); use weights nearer 1")
    return out.reshape(rows, tokens, dim)
