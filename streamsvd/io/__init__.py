"""Reading checkpoints and text, writing outputs, scratch files and disk checks."""
