"""What the publisher and the consumer both speak: errors, configs, cache and assets, manifest,
pruned-model classes, accounting, hub I/O and data loading."""
