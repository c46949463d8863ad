"""The vocabulary every layer speaks: errors, conditioning, guidance and batch layouts, prompts and their
attributes, images, checkpoints, configurations, runtime, tokenization, atomic outputs. Imports nothing above it."""
