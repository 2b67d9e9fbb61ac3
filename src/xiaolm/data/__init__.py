"""xiaolm.data."""
