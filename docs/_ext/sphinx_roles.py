"""A Griffe extension for the API reference: writeturn's docstrings name other objects
with reST roles (``:class:`~writeturn.WriteSerializer```), which Markdown would show as
literal ``:class:`` text. Each role becomes inline code of the name a reader would see:
the last component when the target starts with ``~``, the target as written otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|exc|attr|data|obj|const):`(~?)([^`]+)`")


def _shown(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    name = target.rsplit(".", 1)[-1] if short else target
    return f"`{name}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_shown, obj.docstring.value)
