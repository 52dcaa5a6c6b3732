"""Plumbing that every layer of mmret uses and that uses nothing of mmret above it: atomic file
writes (`io`), progress reporting without a terminal (`progress`), device and precision choice
(`device`), the data and runs roots and the names allowed in them (`paths`), and file digests
(`digest`)."""
