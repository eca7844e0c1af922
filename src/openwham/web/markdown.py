"""The agent's answers as HTML: CommonMark through markdown-it-py, made safe for the page.

The agent's text is untrusted (it echoes repositories, web pages, prompts), so raw HTML is
never passed through (``html=False`` escapes it), links keep only ``http``, ``https`` and
``mailto`` targets and open with ``rel="noopener noreferrer"``, images become links (the CSP
would block other origins anyway), and fenced code is highlighted with Pygments into the
same ``t-*`` classes as the diff view, so no inline style is needed under the strict CSP.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from markupsafe import Markup
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.token import STANDARD_TYPES, _TokenType
from pygments.util import ClassNotFound

SAFE_SCHEMES = ("http", "https", "mailto")


def _safe_link(url: str) -> bool:
    """Only absolute http(s) and mailto links; everything else stays text."""
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return False
    return scheme in SAFE_SCHEMES


def _css_class(ttype: _TokenType) -> str:
    while ttype not in STANDARD_TYPES:
        ttype = ttype.parent
    return str(STANDARD_TYPES.get(ttype, ""))


def _lexer(lang: str) -> Lexer | None:
    if not lang:
        return None
    try:
        return get_lexer_by_name(lang, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


def _highlight(code: str, lang: str, _attrs: str) -> str:
    """Pygments tokens as ``<span class="t-…">`` (escaped); '' lets markdown-it escape it."""
    name = lang.strip().split()[0] if lang.strip() else ""
    lexer = _lexer(name)
    if lexer is None:
        return ""
    parts = []
    for ttype, value in lexer.get_tokens(code):
        css = _css_class(ttype)
        text = escape(value, quote=False)
        parts.append(f'<span class="t-{css}">{text}</span>' if css else text)
    code_html = "".join(parts)
    return (
        f'<pre class="code-block"><code class="language-{escape(name)}">{code_html}</code></pre>\n'
    )


def _render_link_open(
    renderer: RendererHTML,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    tokens[idx].attrSet("rel", "noopener noreferrer")
    return renderer.renderToken(tokens, idx, options, env)


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "highlight": _highlight})
    md.disable("image")
    md.validateLink = _safe_link  # type: ignore[method-assign]
    md.add_render_rule("link_open", _render_link_open)
    return md


_MD = _parser()


def render(text: Any) -> Markup:
    """The answer's markdown as safe HTML for a template."""
    return Markup(_MD.render(str(text or "")))
