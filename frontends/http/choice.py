"""One choice of a chat or completions request, as the handler answers it.

A choice is one generation on the bus: its request, the parsers that read its
text (tool calls; the reasoning, apart from the content) and what it has
produced so far, for the whole answer or the next streamed chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.core.reasoning import ReasoningReader
from lmserve.core.tool_calls import ToolParser
from lmserve.core.types import GenerationOutput, GenerationRequest, TokenLogprob


@dataclass
class Choice:
    """One generation of a request and what it has made; ``index`` is its place in the answer."""

    index: int
    request: GenerationRequest
    echo: str = ""  # text put before the generated text (completions' echo)
    #: Reads tool calls out of the text (a chat request with tools).
    tool_parser: ToolParser | None = None
    called_tools: bool = False  # a tool-call delta was streamed
    #: Splits the reasoning from the content (a chat request on a server with a reasoning parser);
    #: the tool parser reads only the content.
    reasoning: ReasoningReader | None = None
    reasoning_text: list[str] = field(default_factory=list)
    content_text: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    last: GenerationOutput | None = None

    @property
    def text_length(self) -> int:
        return len(self.echo) + sum(len(piece) for piece in self.text)

    def split(self, out: GenerationOutput | None) -> tuple[str, str]:
        """``out``'s new text as ``(reasoning, content)`` (None: the end, what was held back),
        kept for the whole answer too; all content without a reasoning parser."""
        if self.reasoning is None:
            return "", "" if out is None else out.text
        reasoning, content = self.reasoning.flush() if out is None else self.reasoning.feed(
            out.text, len(out.token_ids))
        self.reasoning_text.append(reasoning)
        self.content_text.append(content)
        return reasoning, content
