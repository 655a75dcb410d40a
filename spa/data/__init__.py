"""Data in: preference sources (files, folders, hub datasets), prompt ids, overlong rows, new prompt batches."""
