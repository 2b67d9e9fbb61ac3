"""xiaolm.eval."""
