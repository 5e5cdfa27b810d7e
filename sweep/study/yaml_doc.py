"""A study file's YAML with the line of every key, and the context that turns a
problem into one ``FILE: KEY.PATH (line N): problem`` line."""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import yaml

from sweep.errors import StudyFileError

# --- YAML with line numbers -------------------------------------------------------------------

class _LineDict(dict):
    """A dict that remembers the line of each key, so errors can point into the file."""

    lines: dict


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    result = _LineDict()
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise StudyFileError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Ctx:
    """Builds one-line errors: ``file: key.path (line N): problem``."""

    def __init__(self, source: str, doc: Mapping, overridden: set[tuple] = frozenset()):
        self.source, self.doc, self.overridden = source, doc, overridden

    def fail(self, path: tuple, problem: str) -> StudyFileError:
        return StudyFileError(f"{self.source}: {self.where(path)}: {problem}")

    def where(self, path: tuple) -> str:
        """``key.path (line N)``, or ``(--set)`` for a value from the command line."""
        where = ".".join(map(_key_text, path)) or "(top level)"
        if tuple(path) in self.overridden:
            return f"{where} (--set)"  # the value came from the command line, not the file
        line = self._line(path)
        return f"{where} (line {line})" if line else where

    def _line(self, path: tuple) -> int | None:
        node, line = self.doc, None
        for key in path:
            if isinstance(node, dict) and key in node:
                line = getattr(node, "lines", {}).get(key, line)
                node = node[key]
            else:
                break
        return line


def _key_text(key) -> str:
    """A key as it appears in an error: plain when it is a plain word, else quoted (a key of
    whitespace or control characters must not break the one-line message)."""
    text = str(key)
    return text if text and text.isprintable() and text.strip() == text else repr(key)


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(ctx: _Ctx, path: tuple, section: Any, valid) -> Mapping:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ctx.fail(path, f"must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in valid:
            raise ctx.fail(path + (key,), f"unknown key{_suggest(key, valid)}; valid keys: "
                                          f"{', '.join(valid)}")
    return section


