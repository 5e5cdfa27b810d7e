"""Examples of sweep with your own network: ``tiny_cnn.py`` and its study ``tiny_cnn.yaml``
(docs/your-model.md). A package so that ``examples.tiny_cnn:build_net`` imports from the
repository root."""
