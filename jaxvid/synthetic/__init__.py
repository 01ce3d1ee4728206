"""Synthetic checkpoints: tiny random pipelines in the original folder layouts, random weights at any size.

    jaxvid.synthetic.cogvideox       write_tiny_pipeline (the embedded tiny default), write_random_cogvideox
    jaxvid.synthetic.longcat         write_tiny_longcat (every LongCat-Video mode on a CPU)
    jaxvid.synthetic.random_weights  real-size models filled on the device (benchmarks)

Importing this package is cheap: the writers import their modules on first use.
"""
