"""Property-based tests: the matcher and every registered pass on drawn graphs."""
