"""Suppression lists (layer 4): addresses never to send to again, such as those that
bounced hard or complained.

Owns the list's file: a UTF-8 text file, one address per line, a ``# reason`` after it
or on a line of its own, blank lines ignored::

    # asmtp suppression list
    ann@example.org  # hard 5.1.1 2026-12-06
    bee@example.net

Addresses compare as asmtp compares them everywhere (duplicates in a recipients file,
journal keys): the domain case-insensitively (an IDN and its A-label form alike), the
local part exactly (RFC 5321 2.4 leaves its case to the receiving host).

The file is read once, when the list is made; a missing file is an empty list, created
by the first :meth:`SuppressionList.add`. Adding appends one line under an exclusive
``flock`` (so that two writers, say ``asmtp bounces`` run twice at once, never
interleave or list an address twice) and fsyncs it before returning. A file that is not
a suppression list (not UTF-8 text, NUL bytes, a line that is no address) is refused
with an :class:`~asmtp.errors.InputError` naming it and never written to.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from .._core.address import check_mailbox
from .._core.recipients import address_key
from ..errors import InputError
from .journal import sync_folder

__all__ = ["SuppressionList", "suppression_key"]

# A reason or a comment runs to the end of its line: nothing that ends a line in it.
_LINE_BREAK = re.compile("[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# "ann@example.org  # reason": a '#' after white space starts the comment ('#' is a
# valid character of a local part, "a#b@example.org").
_COMMENT = re.compile(r"\s+#")


def suppression_key(address: str) -> str:
    """The form an address is listed and looked up in: checked, its domain in A-labels
    and lower case. Raises :class:`~asmtp.errors.InputError` for what is no address.

    >>> suppression_key("Ann@Example.ORG")
    'Ann@example.org'
    """
    return address_key(check_mailbox(address, field="suppressed address"))


class SuppressionList:
    """Addresses not to send to: ``SuppressionList("suppressed.txt")`` reads a file (see
    the module's docstring), ``SuppressionList(["ann@example.org"])`` holds addresses in
    memory only.

    >>> suppressed = SuppressionList(["ann@example.org"])
    >>> "ann@EXAMPLE.org" in suppressed, "Ann@example.org" in suppressed
    (True, False)
    """

    def __init__(self, source: str | os.PathLike[str] | Iterable[str]) -> None:
        #: the file (None: a list in memory)
        self.path: Path | None = None
        #: reason (or None) by suppression key
        self._reasons: dict[str, str | None] = {}
        #: octets and whole lines of the file read so far
        self._size = 0
        self._lines = 0
        if isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            self._load()
        else:
            for address in source:
                if not isinstance(address, str):
                    raise InputError(f"a suppression list holds addresses: {address!r}")
                self._reasons.setdefault(suppression_key(address), None)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and self._lookup(address)[0]

    def __len__(self) -> int:
        return len(self._reasons)

    def why(self, address: str) -> str | None:
        """Why ``address`` is not to be sent to (its reason, else "listed in FILE");
        None when it is not listed."""
        listed, reason = self._lookup(address)
        if not listed:
            return None
        if reason:
            return reason
        return f"listed in {self.path}" if self.path is not None else "listed"

    def _lookup(self, address: str) -> tuple[bool, str | None]:
        try:
            key = suppression_key(address)
        except InputError:
            return False, None  # not an address: not listed (sending it fails on its own)
        if key not in self._reasons:
            return False, None
        return True, self._reasons[key]

    def add(self, address: str, reason: str = "") -> bool:
        """List ``address`` (with ``reason``, e.g. "hard 5.1.1 2026-12-06"), appended to
        the file durably; False when it was listed already (by this list, or by another
        writer of the file since it was read). Raises
        :class:`~asmtp.errors.InputError` for an address or reason that would not read
        back as one line."""
        if not isinstance(reason, str) or _LINE_BREAK.search(reason):
            raise InputError(f"a suppression reason must be one line of text: {reason!r}")
        if not isinstance(address, str) or _LINE_BREAK.search(address):
            raise InputError(f"a suppressed address must be one line of text: {address!r}")
        key = suppression_key(address)
        if _COMMENT.search(key) or key.startswith("#"):
            raise InputError(f"{address!r} cannot be listed: it would read back as a comment")
        reason = reason.strip()
        if key in self._reasons:
            return False
        if self.path is None:
            self._reasons[key] = reason or None
            return True
        line = f"{key}  # {reason}\n" if reason else f"{key}\n"
        return self._append(key, reason or None, line.encode("utf-8"))

    # -- the file -----------------------------------------------------------------

    def _open(self, flags: int) -> int:
        assert self.path is not None
        try:
            fd = os.open(self.path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, 0o666)
        except OSError as exc:
            raise InputError(
                f"cannot use the suppression list {self.path}: {exc.strerror}"
            ) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError(
                    f"the suppression list {self.path} is not a regular file: give a text file"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return  # an empty list; the first add() creates the file
        except OSError as exc:
            raise InputError(
                f"cannot read the suppression list {self.path}: {exc.strerror}"
            ) from exc
        if not stat.S_ISREG(st.st_mode):  # before opening: a FIFO would block
            raise InputError(
                f"the suppression list {self.path} is not a regular file: give a text file"
            )
        fd = self._open(os.O_RDONLY)
        try:
            self._read_new(fd)
        finally:
            os.close(fd)

    def _read_new(self, fd: int) -> bool:
        """Read what was appended after what was read so far (all of it, the first
        time); whether the file now ends in a newline (an empty one counts as such)."""
        end = os.fstat(fd).st_size
        data = bytearray()
        while self._size + len(data) < end:
            at = self._size + len(data)
            chunk = os.pread(fd, min(1 << 20, end - at), at)
            if not chunk:
                break  # shrank meanwhile
            data += chunk
        if not data:
            return self._size == 0 or os.pread(fd, 1, self._size - 1) == b"\n"
        # A last line without its newline (written by hand) is read too; an append
        # puts a newline before its own line.
        for raw in bytes(data).split(b"\n"):
            self._lines += 1
            self._parse(raw, self._lines)
        self._lines -= 1  # the split's last piece is the line still open (maybe empty)
        self._size += len(data)
        return data.endswith(b"\n")

    def _refuse(self, number: int, why: str) -> InputError:
        return InputError(
            f"{self.path} is not a suppression list (line {number}: {why}); expected one address "
            "per line, with '# comments'"
        )

    def _parse(self, raw: bytes, number: int) -> None:
        if b"\x00" in raw:
            raise self._refuse(number, "it holds NUL bytes (a binary file?)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse(number, "it is not UTF-8 text") from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        text = text.rstrip("\r")
        found = _COMMENT.search(text)
        address, reason = (text[: found.start()], text[found.end() :]) if found else (text, "")
        address = address.strip()
        if not address or address.startswith("#"):
            return  # blank, or a comment line
        try:
            key = suppression_key(address)
        except InputError:
            shown = address if len(address) <= 80 else address[:80] + "..."
            raise self._refuse(number, f"{shown!r} is not an address") from None
        self._reasons.setdefault(key, reason.strip() or None)

    def _append(self, key: str, reason: str | None, line: bytes) -> bool:
        assert self.path is not None
        created = not self.path.exists()
        fd = self._open(os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
            # Another writer may have appended since the file was read: read its lines.
            ends_in_newline = self._read_new(fd)
            if key in self._reasons:
                return False
            data = line if ends_in_newline else b"\n" + line
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                raise InputError(
                    f"cannot write the suppression list {self.path}: {exc.strerror}"
                ) from exc
            self._size += len(data)
            self._reasons[key] = reason
        finally:
            os.close(fd)
        if created:
            sync_folder(self.path)
        return True
