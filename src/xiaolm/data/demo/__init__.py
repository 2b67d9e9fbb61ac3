"""xiaolm.data.demo."""
