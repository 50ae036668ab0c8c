"""The networks as data: layer specs, the neutral weight layout, the checkpoint format,
the fp16 loss scale."""
