"""Small builders shared by the tests; the conformance kit's own are reused, not copied."""

from tarflow_core.conformance.common import TOLERANCE, per_sequence_logdet, randomise

__all__ = ["TOLERANCE", "per_sequence_logdet", "randomise"]
