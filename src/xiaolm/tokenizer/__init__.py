"""xiaolm.tokenizer."""
