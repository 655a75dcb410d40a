"""The pipeline's stages, one module each: set up from config, run, save artifacts."""
