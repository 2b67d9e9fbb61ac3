"""xiaolm.train."""
