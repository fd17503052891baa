"""The built-in reasoning parser: the built-in of :hook:`lmserve_reasoning_parsers`.

``default`` reads the ``<think>`` ... ``</think>`` protocol that Qwen3, QwQ, the
DeepSeek-R1 distills, DeepSeek-V3.1 and later, and Intern-S1 share (the reading
itself, and where the reasoning starts, is :class:`~lmserve.core.reasoning.ReasoningParser`'s).
Its aliases are LMDeploy's names: the legacy ``qwen-qwq``, ``deepseek-r1`` and
``intern-s1``, and the DeepSeek ones (``deepseek-v3``, ``deepseek-v32``,
``deepseek-v3.2``, ``deepseek-v4``), which LMDeploy starts in the reasoning only
when the request turns thinking on: here the prompt says so already, since
DeepSeek's templates end the generation prompt with ``<think>`` when thinking is
on and with ``</think>`` when it is off. ``--reasoning-parser none`` turns the
split off.
"""

from __future__ import annotations

from lmserve.core import hookimpl
from lmserve.core.reasoning import ReasoningParser


class ThinkTagReasoningParser(ReasoningParser):
    """``<think>`` reasoning ``</think>`` content: the tags Qwen3, QwQ, DeepSeek-R1 and Intern-S1 write."""

    name = "default"
    aliases = ("think", "qwen3", "qwen-qwq", "qwq", "deepseek-r1", "deepseek_r1", "intern-s1",
               "deepseek-v3", "deepseek_v3", "deepseek-v31", "deepseek-v3.1", "deepseek-v32", "deepseek-v3.2",
               "deepseek-v4")


BUILTIN_REASONING_PARSERS: tuple[type[ReasoningParser], ...] = (ThinkTagReasoningParser,)


@hookimpl(trylast=True)
def lmserve_reasoning_parsers():
    return list(BUILTIN_REASONING_PARSERS)
