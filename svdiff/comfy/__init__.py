"""The ComfyUI layer: the only code of this extension that imports ComfyUI.

Below it, ``svdiff/`` is the pure core (torch, safetensors, no ComfyUI; a test proves
it); above it, ``nodes/`` holds the node schemas and calls into this package. Modules:
``adapter`` (the weight adapter ComfyUI patches with), ``bypass`` (bypass-mode hooks),
``patching`` (a shift onto a MODEL/CLIP), ``export`` (as a LoRA), ``folders`` (model
folders and output files), ``editing`` (DDIM inversion, η-DDIM), ``merge`` (Custom
Diffusion's closed-form merge), ``tokens`` (what the tokenizers make of a word), and
``training/`` (the training run).
"""
