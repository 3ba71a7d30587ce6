"""Developer tools run from the repository (not imported by the operator at run time)."""
