"""Benchmark harness (outside the library): kmclust against scikit-learn, faiss and dask-ml on the path users run."""
