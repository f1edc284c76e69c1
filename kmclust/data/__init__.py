"""Data in: IDX parsing, sources, staging into zarr stores, opening a store and selecting rows."""
