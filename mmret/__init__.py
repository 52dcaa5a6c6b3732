"""mmret: image-text and audio-text retrieval you can train on one consumer GPU or a laptop CPU."""

__version__ = "0.1.0"
