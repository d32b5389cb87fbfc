"""Recipe step 1, look at the data: :func:`~.inspect.inspect_dataset` reads a dataset once
(:mod:`.scan`) and turns what it saw into findings (:mod:`.findings`)."""
