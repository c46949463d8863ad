"""Pieces several backends share: identity files, face embedders, layers, random identity encoders."""
