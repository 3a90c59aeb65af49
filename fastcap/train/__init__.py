"""Training: config dataclasses and presets, the DeepSpeed ZeRO-3 engine set-up, the loop,
scheduled teacher forcing, evaluation. The only package that imports DeepSpeed."""
