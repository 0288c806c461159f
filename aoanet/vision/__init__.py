"""The visual front-end on the training side: backbones in Paddle (EfficientNet-Lite0, ResNet-50/101/152 grids),
their export as an image extractor (``extractor.onnx`` + ``extractor.json``, the contract of
``aoanet_runtime.extractor``), feature extraction into a data directory (``aoanet-data extract``), and the embedded
dataset's scenes rendered as pictures. docs/images.md describes the whole stage."""
