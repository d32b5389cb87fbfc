"""Pure tensor maths behind the callbacks, testable without a Trainer."""

__all__: list[str] = []
