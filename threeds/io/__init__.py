"""Reading and writing files: records, atomic replacement, the write lock, cached arrays."""
