"""Where diagnostics meet TensorBoard: writing (:mod:`.writer`), reading back (:mod:`.events`),
the figures the monitors draw (:mod:`.figures`)."""
