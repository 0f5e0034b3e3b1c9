"""What the publisher and the consumer both speak, and nothing else: the architecture table, the manifest
and its integrity checks, the pruned-model classes and their loaders, Hub I/O and model cards, the data
reader, the training core and its pickle-free checkpoints, configs and CLI plumbing, outputs, errors,
runtime and the embedded assets. Nothing here imports `loram.publisher` or a consumer module
(tests/shared/test_layering.py)."""
