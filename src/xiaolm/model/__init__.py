"""xiaolm.model."""
