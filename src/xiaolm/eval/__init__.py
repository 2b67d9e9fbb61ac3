"""xiaolm.eval."""

TASKS = ("ppl", "bleu", "rouge", "choice", "exact", "extraction", "preference")  # `xiaolm eval --task`
