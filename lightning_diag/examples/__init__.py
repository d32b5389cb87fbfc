"""The digits model and data (:mod:`.digits`) and the demo that runs the whole recipe on them
(:mod:`.demo`)."""
