"""Testbeds, by subject (layer 9): each a complete use of the layers below it, in one folder.

- :mod:`~diffusion_blend.testbeds.gmm`: the 2-D Gaussian mixture, where every expert and tilted target is exact;
- :mod:`~diffusion_blend.testbeds.digits`: real 8x8 handwritten digits, the embedded base model, its rewards and
  the end-to-end demo.
"""
