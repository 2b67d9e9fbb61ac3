"""xiaolm.infer."""
