"""fmnist: a reproducible Fashion-MNIST study with a Keras CNN, and its real-time classifier."""

__version__ = "0.1.0"
