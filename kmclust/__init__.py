"""kmclust: k-means of MNIST-like images on Dask."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kmclust")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

__all__ = ["__version__", "KMeans"]


def __getattr__(name: str):
    # Lazy so that `import kmclust` stays light (no sklearn/dask at import).
    if name == "KMeans":
        from kmclust.estimator import KMeans

        return KMeans
    raise AttributeError(name)
