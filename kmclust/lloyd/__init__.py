"""Lloyd's algorithm over a store's chunks: kernels, inits, pass plans, executors, the driver."""
