"""Training spectral shifts (and Custom Diffusion's K/V deltas) inside ComfyUI.

``run.train(TrainRequest(...))`` is the one entry point; the files hold, in the order a
run uses them: ``examples`` (the one example type, from a dataset), ``priors`` (class
images), ``layers`` (the trainable layers on a patcher), ``modifier`` (a new token),
``autograd`` (making ComfyUI's models differentiable), ``attention`` (cross-attention
capture), ``guider`` (running inside ComfyUI's sampler machinery), ``loss`` (eq. 3),
``run`` (the run itself), ``jobs`` (what the training nodes do around a run).
"""
