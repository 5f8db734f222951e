"""Text tokens named as a user names them: words of the prompt, and positions in T5's sequence.

T5 tokenizes with sentencepiece: a token that begins a word starts with '▁', and a word may be split
into several tokens ('▁', 'f', 'o', 'x'). A word names the run of tokens that spells it; a number names
a position, or where it is also a word of the prompt is refused as ambiguous ('3' in '3 dogs'; '1984',
past the last position, can only be the word).
"""

import re
from collections.abc import Sequence

from flux.capture import flag_text, format_steps, means_all, parse_ranges
from flux.errors import UsageError, UserError

WORD_START = "\u2581"  # sentencepiece's mark of a token that begins a word


def is_special(token: str) -> bool:
    """Whether a T5 token is a special one, such as '</s>' or '<pad>'."""
    return token.startswith("<") and token.endswith(">")


def select_tokens(tokens, t5_tokens: Sequence[str] | None, txt_len: int) -> list[int]:
    """Text positions from a --tokens value: None or 'all' for every token of the prompt, else a list of
    words of the prompt (each selects the tokens that spell it) and positions or ranges ('0-3')."""
    prompt = list(t5_tokens or ())
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        tokens = str(tokens)
    text = flag_text(tokens)
    if means_all(text):
        if not prompt:
            raise UserError(
                "This capture does not record its prompt's T5 tokens (made by an older version): name the "
                f"text positions to measure, e.g. --tokens 0-9 (0 to {txt_len - 1})."
            )
        return list(range(len(prompt)))
    picked: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue  # 'fox,' or 'fox,,red'
        if re.fullmatch(r"\d+(-\d+(:\d+)?)?", item):  # '3', '0-3', '0-9:2'; not a word such as '3d'
            word = _word_or_none(item, prompt) if item.isdigit() else None  # '3' in '3 dogs', '1984'
            try:
                found = parse_ranges(item, txt_len, "--tokens", "text positions")
            except UsageError:
                if not word:
                    raise
                found = word  # no such position, but a word of the prompt: '1984'
            else:
                if word and word != found:
                    raise UsageError(
                        f"--tokens: {item!r} is both text position {item} and a word of the prompt (at "
                        f"positions {format_steps(word)}): write '{item}-{item}' for the position, or "
                        f"'{format_steps(word)}' for the word."
                    )
        elif len(item.split()) > 1:
            raise UsageError(
                f"--tokens: {item!r} is not one word: separate words with commas, e.g. "
                f"--tokens {','.join(item.split())}."
            )
        else:
            try:
                found = spelled_by(item, prompt)
            except UsageError:
                if item[0].isdigit():  # more likely a mistyped range ('3-') than a word: say how to write one
                    parse_ranges(item, txt_len, "--tokens", "text positions")
                raise
        picked += [p for p in found if p not in picked]
    if not picked:
        raise UsageError("--tokens names no token.")
    return picked


def _word_or_none(word: str, prompt: Sequence[str]) -> list[int] | None:
    """spelled_by, or None where `word` is not a word of the prompt."""
    try:
        return spelled_by(word, prompt)
    except UsageError:
        return None


def spelled_by(word: str, prompt: Sequence[str]) -> list[int]:
    """The positions of the tokens that spell `word` (case ignored) wherever it stands as a whole word in
    the prompt: a run of tokens from one that begins a word up to the next that does, or up to punctuation
    that ends it ('fox' in 'fox,' is '▁fox' without the ',' that follows it)."""
    wanted = word.lower()
    plain = [t.removeprefix(WORD_START).lower() for t in prompt]
    found: list[int] = []
    for i, token in enumerate(prompt):
        if not token.startswith(WORD_START) and i:
            continue
        spelled = ""
        for j in range(i, len(prompt)):
            if j > i and prompt[j].startswith(WORD_START):
                break  # the next word: 'redfox' is not spelled by '▁red', '▁', 'f', 'o', 'x'
            spelled += plain[j]
            if spelled == wanted and ends_word(prompt, j + 1):
                found += range(i, j + 1)
                break
            if not wanted.startswith(spelled):
                break
    if not found:
        shown = ", ".join(f"{n}:{t}" for n, t in enumerate(prompt))
        raise UsageError(
            f"--tokens: {word!r} is not a word of the prompt. Its T5 tokens are {shown}; name words, or "
            "positions such as '0-3'."
        )
    return found


def ends_word(prompt: Sequence[str], j: int) -> bool:
    """Whether a word ends before prompt[j]: it begins a word (sentencepiece marks those), is a special
    token such as '</s>', or is punctuation with nothing but punctuation before the next word ('fox,' and
    'fox.' end 'fox'; "don't" and 'sci-fi' do not end 'don' and 'sci')."""
    for token in prompt[j:]:
        if token.startswith(WORD_START) or is_special(token):
            return True
        if any(c.isalnum() for c in token):
            return False
    return True
