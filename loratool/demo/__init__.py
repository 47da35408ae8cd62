"""The embedded demo model: a small SDXL-architecture base + refiner trained on generated shapes.

`shapes` generates the scenes and measures them, `build` trains and saves the model, `quality` checks that
renders agree with their captions.
"""
