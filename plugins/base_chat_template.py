"""Contributes the ``base`` chat template (the identity) to the registry.

The template itself is the kernel's, since it is also the choice's last resort
(:class:`lmserve.core.fields_chat_template.BaseChatTemplate`); here it joins the
registry, so ``--chat-template base`` picks it and ``lmserve templates`` lists it.
"""

from __future__ import annotations

from lmserve.core import hookimpl
from lmserve.core.fields_chat_template import BaseChatTemplate


@hookimpl
def lmserve_chat_templates():
    return [BaseChatTemplate()]
