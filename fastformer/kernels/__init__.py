"""kernels layer (see DESIGN.md §1)."""
