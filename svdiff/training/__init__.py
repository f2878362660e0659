"""Training spectral shifts: layers, objective, loop, datasets (pure torch; the run inside
ComfyUI lives in svdiff/comfy/training/)."""
