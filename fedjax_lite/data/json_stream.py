"""Incremental reading of large JSON objects (host side, standard library only).

A LEAF file is one JSON object of a few keys whose ``user_data`` member holds every
user's examples; such files run to gigabytes. :class:`JsonStream` reads a file through a
sliding window of characters and decodes one value at a time with
``json.JSONDecoder.raw_decode``, dropping the text it has parsed, so memory holds the
largest single value (one user's record), not the file. Errors are ValueErrors that
name the file and the line:column of the problem.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
# A decode error this close to the end of the window may be the window's end cutting a
# value short (a literal like -Infinity, an escape like \uXXXX\uXXXX): read on and retry.
_TAIL = 16


class JsonStream:
    """A JSON text read incrementally (``buffer_size`` characters at a time)."""

    def __init__(self, path: str, buffer_size: int = 1 << 20):
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be positive")
        self.path = path
        self.chunk = int(buffer_size)
        self._file = open(path, encoding="utf-8", newline="")
        self.buf, self.pos, self.eof = "", 0, False
        self._line, self._col = 1, 0       # line (1-based) and column (0-based) of buf[0]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the window

    def _fill(self, at_least: int = 0) -> None:
        """Drops the parsed prefix and appends at least ``max(at_least, chunk)`` chars."""
        if self.pos:
            newlines = self.buf.count("\n", 0, self.pos)
            if newlines:
                self._line += newlines
                self._col = self.pos - self.buf.rfind("\n", 0, self.pos) - 1
            else:
                self._col += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        try:
            data = self._file.read(max(at_least, self.chunk))
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text after line {self._line} "
                             f"({e.reason})") from None
        if not data:
            self.eof = True
        self.buf += data

    def where(self, i: int | None = None) -> str:
        """``line:column`` (1-based) of window index ``i`` (default: the cursor)."""
        i = self.pos if i is None else i
        newlines = self.buf.count("\n", 0, i)
        if newlines:
            return f"{self._line + newlines}:{i - self.buf.rfind(chr(10), 0, i)}"
        return f"{self._line}:{self._col + i + 1}"

    def error(self, message: str, i: int | None = None) -> ValueError:
        return ValueError(f"{self.path}: malformed JSON at line:column {self.where(i)}: "
                          f"{message}")

    # ------------------------------------------------------------------ tokens

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < n or self.eof:
                return self.buf[self.pos] if self.pos < n else ""
            self._fill()

    def expect(self, allowed: str, context: str) -> str:
        """Consumes the next character, which must be one of ``allowed``."""
        c = self.peek()
        if not c or c not in allowed:
            found = repr(c) if c else "the end of the file"
            wanted = " or ".join(repr(a) for a in allowed)
            raise self.error(f"expected {wanted} {context}, found {found}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decodes the next JSON value."""
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                truncated = (e.msg.startswith("Unterminated string")
                             or e.pos >= len(self.buf) - _TAIL)
                if self.eof or not truncated:
                    raise self.error(e.msg, e.pos) from None
                self._fill(len(self.buf) - self.pos)    # double the window: linear time
                continue
            if end == len(self.buf) and not self.eof:   # a number may go on
                self._fill(len(self.buf) - self.pos)
                continue
            self.pos = end
            return obj

    def key(self, context: str) -> str:
        if self.peek() != '"':
            raise self.error(f"expected a string key {context}")
        return self.value()

    def members(self, context: str) -> Iterator[str]:
        """Iterates over an object's keys (the object's '{' is consumed here); after each
        key the caller must consume its value before asking for the next key."""
        self.expect("{", context)
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            name = self.key(context)
            self.expect(":", f"after the key {name!r}")
            yield name
            if self.expect(",}", f"after the value of {name!r}") == "}":
                return

    def end(self) -> None:
        """Only whitespace may follow the top-level value."""
        if self.peek():
            raise self.error("unexpected text after the top-level JSON value")
