"""A tiny member configuration: the real network's code paths in milliseconds."""

from tusrec.model.network import ModelConfig

TINY = ModelConfig(
    input_size=(16, 20),
    channels=(8, 8),
    global_channels=(8, 8),
    dim=16,
    heads=2,
    global_frames=4,
    window=4,
    overlap=2,
)
