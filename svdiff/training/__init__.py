"""Training spectral shifts: layers, objective, loop (pure torch; ComfyUI glue lives in
svdiff/comfy_bridge.py and nodes/)."""
