"""Where diagnostics meet TensorBoard: the tag registry (:mod:`.tags`), writing (:mod:`.writer`),
reading back (:mod:`.events`), the figures the monitors draw (:mod:`.figures`)."""
