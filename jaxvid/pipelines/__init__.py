"""Generation pipelines: load components, encode text, denoise in one jit, decode."""
