"""Records, shared by every stage: the readers, the reject log, input files and the text of a record."""
