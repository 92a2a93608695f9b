"""reference layer (see DESIGN.md §1)."""
