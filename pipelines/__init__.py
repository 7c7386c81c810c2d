"""Glue that runs notebooks/NN_<stage>.ipynb with papermill as DVC stages. Holds no stage logic."""
