"""Task titles generated from the prompt.

Codex cloud asks a model for a title; openwham derives one from the prompt instead, so a title
costs no model request, no tokens and no latency, and works with any upstream (docs/api.md).
The title is the prompt's first sentence without code, markdown or polite preamble, cut at a
word boundary.
"""

from __future__ import annotations

import re

MAX_TITLE_CHARS = 60
_FENCE = re.compile(r"```.*?(```|$)", re.S)
_PREFIX = re.compile(
    r"^(?:(?:please|pls|hey|hi|hello|ok|okay|so|now|codex)\b[,:!]?\s*)+"
    r"|^(?:can|could|would|will)\s+you\s+(?:please\s+)?"
    r"|^(?:i\s+(?:want|need|would\s+like)\s+(?:you\s+)?to\s+)"
    r"|^(?:help\s+me\s+(?:to\s+)?)",
    re.I,
)
_MARKUP = re.compile(r"^(?:#+\s*|[-*+]\s+|\d+[.)]\s+|>\s*)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def generate_title(prompt: str) -> str:
    text = _FENCE.sub(" ", prompt)
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = _MARKUP.sub("", line)
    line = _SENTENCE_END.split(line, maxsplit=1)[0]
    line = line.replace("`", "").replace("**", "")
    line = " ".join(line.split())
    for _ in range(3):
        stripped = _PREFIX.sub("", line).strip()
        if stripped == line:
            break
        line = stripped
    line = line.rstrip(" .!:;,")
    if not line:
        return "New task"
    if len(line) > MAX_TITLE_CHARS:
        cut = line[: MAX_TITLE_CHARS - 1]
        if " " in cut[MAX_TITLE_CHARS // 2 :]:
            cut = cut.rsplit(" ", 1)[0]
        line = cut.rstrip(" ,;:-") + "…"
    return line[0].upper() + line[1:]
