"""Lloyd's algorithm over a store's chunks: kernels, initialisations, pass plans, executors, the driver."""
