"""train layer (see DESIGN.md §1)."""
