"""The engine's redaction: :mod:`openwham.redaction` (a layer of its own, since the model
gateway and the PR service need the same matching)."""

from openwham.redaction import MARK, MIN_ENCODED, Redactor, encodings, needles, secrets_in_diff

__all__ = ["MARK", "MIN_ENCODED", "Redactor", "encodings", "needles", "secrets_in_diff"]
