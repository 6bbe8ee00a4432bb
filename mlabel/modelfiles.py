"""The file names of a model directory, in a leaf module: what :mod:`mlabel.modeldir` writes and
reads, and what :func:`mlabel.io.check_output` protects."""

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mlabel.json"
PENDING = META_FILE + ".pending"
