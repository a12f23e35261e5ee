"""Layer 9: the browser UI (``dblend ui``): move a preference, see the blended samples and their rewards."""
