"""Stop strings that may be split across tokens, and streaming that never shows text past a stop."""

from __future__ import annotations


class StopChecker:
    """Accumulates generated text, cuts it at the first stop string, and releases text for
    streaming only once it can no longer turn out to be the start of a stop string."""

    def __init__(self, stops: list[str] | None, include: bool = False):
        self.stops = list(stops or [])
        self.include = include  # keep the stop string that ended the text
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def add(self, delta: str, check: bool = True) -> str | None:
        """Append text; return the stop string if one now occurs (the text is cut before it, or
        after it with ``include``).
        ``check=False`` (before ``min_tokens``) only appends: later checks search from the last
        ``len(stop) - 1`` characters of it on, so no stop string lying wholly inside it counts."""
        if not delta:
            return None
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if not check:
            return None
        best = None
        for s in self.stops:
            j = self.text.find(s, start)
            if j != -1 and (best is None or j < best[0]):
                best = (j, s)
        if best is None:
            return None
        self.text = self.text[:best[0] + (len(best[1]) if self.include else 0)]
        return best[1]

    def take_ready(self, final: bool = False) -> str:
        upto = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
