"""XiaolmError: a failure the user can fix, said in one line: what, where, what to do."""

from __future__ import annotations


class XiaolmError(Exception):
    """An error caused by input or configuration; the CLI prints it without a traceback and exits 2."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None):
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.format())

    def format(self) -> str:
        """Render as `where: what — hint`."""
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} — {self.hint}" if self.hint else text

class Unusable(Exception):
    """A record that cannot be used (no text, a bad chat): a short reason code and an optional detail."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail
