"""Splitting a thinking model's reasoning from its answer: the parser and its choice.

Thinking models (Qwen3, QwQ, DeepSeek-R1 and its distills, Intern-S1) write their
reasoning first, between an open and a close tag (``<think>`` ... ``</think>``),
then the answer. A :class:`ReasoningParser` splits one output into the two, so
the chat routes can answer with ``reasoning_content`` beside ``content`` as
LMDeploy and vLLM do. Parsers come from the :hook:`lmserve_reasoning_parsers`
hook; :func:`choose_reasoning_parser` picks one at startup
(``--reasoning-parser``, else the one whose tags the chat template writes).

Where the reasoning starts is decided per output, from the end of its prompt:

- a prompt that ends (whitespace aside) with the open tag has opened the
  reasoning itself (QwQ's and the DeepSeek-R1 distills' templates end the
  generation prompt with ``<think>\\n``; DeepSeek-V3.1's with ``<think>`` when
  thinking is on): the output is reasoning up to the close tag, and all of it
  when the tag never comes. An open tag the model writes again is dropped;
- otherwise an output that begins (whitespace aside) with the open tag is
  reasoning up to the close tag (Qwen3 writes ``<think>`` itself);
- any other output is all content. A prompt that already holds a closed, empty
  reasoning (Qwen3 with ``enable_thinking: false`` renders ``<think>\\n\\n</think>\\n\\n``)
  ends with no open tag, so its output is content.

The split is exact: the reasoning is the text between the tags, the content the
text after the close tag (neither stripped); the tags themselves and whitespace
before an open tag the model writes belong to neither. Streamed, a piece that
might still begin a tag is held back until the next piece decides it, so the
streamed pieces, joined, equal the split of the whole text, wherever the pieces
were cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

#: ``--reasoning-parser none``: no parser, whatever the chat template writes.
NO_REASONING_PARSER = "none"
#: How many of a prompt's last tokens are read to see whether it opened the reasoning.
PROMPT_END_TOKENS = 32

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


class ReasoningParser:
    """Splits one model output into its reasoning and its content.

    One instance reads one output: the server calls :meth:`feed` with each new
    piece of the output and :meth:`flush` when it ends; :meth:`parse` reads a
    whole text at once. All three are total: they never raise. A subclass names
    its tags; a format that is not a pair of tags overrides :meth:`feed`,
    :meth:`flush` and :attr:`reasoning_over`.

    :param prompt_text: the end of the rendered prompt this output continues
        (its last few dozen tokens, decoded with their special tokens); it
        decides whether the output starts inside the reasoning
        (:meth:`prompt_opens_reasoning`). ``""``: it starts outside.
    """

    #: What ``--reasoning-parser`` calls it.
    name: ClassVar[str]
    #: Other names ``--reasoning-parser`` accepts.
    aliases: ClassVar[tuple[str, ...]] = ()
    #: The tag that opens the reasoning, and the one that closes it.
    open_tag: ClassVar[str] = "<think>"
    close_tag: ClassVar[str] = "</think>"
    #: The tags are special tokens that detokenizing would drop: outputs read by this
    #: parser are decoded with their special tokens. (A tokenizer whose vocabulary
    #: holds a tag as a special token gets the same: see :meth:`keeps_special_tokens`.)
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, prompt_text: str = ""):
        #: Whether the prompt opened the reasoning: the output starts inside it.
        self.starts_in_reasoning = self.prompt_opens_reasoning(prompt_text)
        self._phase = _START
        self._held = ""

    @classmethod
    def fits(cls, template_source: str) -> bool:
        """Whether a chat template writes this format: its source holds both tags.

        Called once at startup when ``--reasoning-parser`` is not given.
        """
        return cls.open_tag in template_source and cls.close_tag in template_source

    @classmethod
    def prompt_opens_reasoning(cls, prompt_text: str) -> bool:
        """Whether a prompt ending in ``prompt_text`` leaves its output inside the
        reasoning: it ends, whitespace aside, with the open tag."""
        return prompt_text.rstrip().endswith(cls.open_tag)

    @classmethod
    def keeps_special_tokens(cls, tokenizer) -> bool:
        """Whether outputs must be decoded with their special tokens for this parser
        to see its tags: :attr:`needs_special_tokens`, or a tag that is one special
        token of ``tokenizer``."""
        if cls.needs_special_tokens:
            return True
        token_to_id, is_special = getattr(tokenizer, "token_to_id", None), getattr(tokenizer, "is_special", None)
        if token_to_id is None or is_special is None:
            return False
        ids = [token_to_id(tag) for tag in (cls.open_tag, cls.close_tag)]
        return any(token_id is not None and is_special(token_id) for token_id in ids)

    @property
    def reasoning_over(self) -> bool:
        """True once no more of this output can be reasoning: the close tag was read,
        or the output began as content."""
        return self._phase == _CONTENT

    def parse(self, text: str) -> tuple[str, str]:
        """A whole output's ``(reasoning, content)``; ``("", text)`` when it has no reasoning."""
        reasoning, content = self.feed(text)
        more_reasoning, more_content = self.flush()
        return reasoning + more_reasoning, content + more_content

    def feed(self, text: str) -> tuple[str, str]:
        """Read the next piece of a streamed output.

        :return: ``(reasoning, content)``: the new text of each that can be shown
            now; text that might still begin a tag is held back.
        """
        self._held += text
        reasoning = ""
        if self._phase == _START:
            self._decide_start()
        if self._phase == _REASONING:
            end = self._held.find(self.close_tag)
            if end >= 0:
                reasoning, self._held = self._held[:end], self._held[end + len(self.close_tag):]
                self._phase = _CONTENT
            else:
                shown = len(self._held) - _partial_tag_length(self._held, self.close_tag)
                reasoning, self._held = self._held[:shown], self._held[shown:]
        content = ""
        if self._phase == _CONTENT:
            content, self._held = self._held, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """End a streamed output: what was held back, as ``(reasoning, content)``.
        A tag cut short is text (the reasoning's, or the content's)."""
        held, self._held = self._held, ""
        phase = self._phase
        if phase == _START:
            phase = _REASONING if self.starts_in_reasoning else _CONTENT
        self._phase = _CONTENT
        return (held, "") if phase == _REASONING else ("", held)

    def _decide_start(self) -> None:
        """Leave the start once the held text decides it: an open tag (whitespace
        before it dropped) starts the reasoning; text that cannot become one starts
        what the prompt left open. Whitespace, or part of the tag, waits."""
        begun = self._held.lstrip()
        if begun.startswith(self.open_tag):
            self._held = begun[len(self.open_tag):]
            self._phase = _REASONING
        elif not self.open_tag.startswith(begun):
            self._phase = _REASONING if self.starts_in_reasoning else _CONTENT


class ReasoningReader:
    """One output read through its :class:`ReasoningParser`, counting the tokens
    spent reasoning (``usage.completion_tokens_details.reasoning_tokens``).

    An output's tokens count as reasoning when they arrive before the reasoning
    is over: the tokens that write the close tag count, those after it do not,
    and an output that never closes its reasoning counts every token (its stop
    token too). An output with no reasoning text counts none.
    """

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self._tokens = 0
        self._reasoned = False

    @classmethod
    def for_prompt(cls, parser: type[ReasoningParser] | None, tokenizer, prompt_ids: Sequence[int], *,
                   constrained: bool = False) -> ReasoningReader | None:
        """A reader for the output of ``prompt_ids`` (None when ``parser`` is None: no split).

        The parser reads the prompt's last :data:`PROMPT_END_TOKENS` tokens, decoded
        with their special tokens, to see where the output starts. A ``constrained``
        output (a grammar's: a response format, a forced tool call) is the grammar's from
        its first token, so it starts outside the reasoning whatever the prompt opened.
        """
        if parser is None:
            return None
        prompt_end = "" if constrained else tokenizer.decode(list(prompt_ids[-PROMPT_END_TOKENS:]))
        return cls(parser(prompt_end))

    @property
    def reasoning_tokens(self) -> int:
        return self._tokens if self._reasoned else 0

    def feed(self, text: str, num_tokens: int) -> tuple[str, str]:
        """The next output piece, ``text`` from ``num_tokens`` tokens: its ``(reasoning, content)``."""
        if not self.parser.reasoning_over:
            self._tokens += num_tokens
        return self._noted(self.parser.feed(text))

    def flush(self) -> tuple[str, str]:
        """The end of the output: what the parser held back."""
        return self._noted(self.parser.flush())

    def _noted(self, split: tuple[str, str]) -> tuple[str, str]:
        self._reasoned = self._reasoned or bool(split[0])
        return split


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (shorter than the tag)."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def choose_reasoning_parser(parsers: Sequence[type[ReasoningParser]], name: str | None,
                            template_source: str) -> type[ReasoningParser] | None:
    """The parser for this server's chat outputs, or None: no reasoning split.

    :param parsers: the parsers of :hook:`lmserve_reasoning_parsers`, in hook order.
    :param name: ``--reasoning-parser``: a parser's name or alias, any case, or
        ``none``; None when the flag is not given.
    :param template_source: the chat template's source (a Jinja template's text).
    :return: the parser named; without a name, the first that fits the template
        (:meth:`ReasoningParser.fits`); else None.
    :raises ValueError: for a name no parser has; the message lists the names.
    """
    if name is not None:
        wanted = name.lower()
        if wanted == NO_REASONING_PARSER:
            return None
        for parser in parsers:
            if wanted in (known.lower() for known in (parser.name, *parser.aliases)):
                return parser
        raise ValueError(f"Unknown reasoning parser {name!r}; known: {_known_names(parsers)}.")
    return next((parser for parser in parsers if parser.fits(template_source)), None)


def reasoning_choice_line(parser: type[ReasoningParser] | None, name: str | None) -> str:
    """The startup line that says which parser splits reasoning, and why."""
    if parser is None:
        why = f"--reasoning-parser {name}" if name is not None else "the chat template writes no reasoning tags"
        return f"reasoning parser: none ({why}): replies are all content"
    why = (f"--reasoning-parser {name}" if name is not None
           else f"the chat template writes {parser.open_tag} and {parser.close_tag}")
    return f"reasoning parser {parser.name!r} ({why}): {parser.open_tag}...{parser.close_tag} goes to reasoning_content"


def _known_names(parsers: Sequence[type[ReasoningParser]]) -> str:
    names = [f"{parser.name} ({', '.join(parser.aliases)})" if parser.aliases else parser.name
             for parser in parsers]
    return ", ".join([*names, NO_REASONING_PARSER])
