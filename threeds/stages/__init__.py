"""The method's stages: rate, generate, score, and the pipeline that runs them."""
