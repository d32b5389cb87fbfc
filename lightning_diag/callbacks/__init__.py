"""One Lightning callback per step of the recipe (see docs/workflow.md)."""

__all__: list[str] = []
