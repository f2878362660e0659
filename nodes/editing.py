"""Single-image editing nodes (CoSINE): DDIM inversion, inverted-latent NOISE, η-DDIM SAMPLER.

Wiring (ComfyUI's custom sampling):

    VAEEncode ─► SVDiffDDIMInversion ─► SVDiffInvertedNoise ─► SamplerCustomAdvanced.noise
    BasicScheduler.SIGMAS ─► both SVDiffDDIMInversion.sigmas and SamplerCustomAdvanced.sigmas
    SVDiffDDIMSampler(η) ─► SamplerCustomAdvanced.sampler
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..svdiff import editing
from ..svdiff.comfy import editing as comfy_editing
from ..svdiff.comfy.progress import NodeProgress
from .common import CATEGORY, log

EDIT_CATEGORY = f"{CATEGORY}/editing"
# Refinements per step at most (they stop at the tolerance first: ~6 per step on the tiny
# test models, see README "Single-image editing").
DEFAULT_REFINE_CAP = 50
# Above this reconstruction error (relative, VAE space) the node warns in the log.
RECONSTRUCTION_WARNING = 0.01


class SVDiffDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffDDIMInversion",
            display_name="DDIM Inversion (SVDiff)",
            category=EDIT_CATEGORY,
            description=(
                "Runs the deterministic DDIM sampler backwards (paper eq. 6): from the encoded image up to the first "
                "noise level of SIGMAS. Connect the same SIGMAS to the sampler that starts from the result. "
                "Use the fine-tuned model and the prompt that describes the image."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The (fine-tuned) model, e.g. SVDiffTrain's or SVDiffLoader's MODEL."),
                io.Conditioning.Input("positive", tooltip="The prompt that describes the image (the paper inverts with it)."),
                io.Latent.Input("latent", tooltip="The image to edit, encoded with this model's VAE (VAEEncode)."),
                io.Sigmas.Input("sigmas", tooltip="The schedule of the edit; wire the same SIGMAS into SamplerCustomAdvanced."),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Guidance during inversion; 1 (the paper's) needs no negative.",
                ),
                io.Int.Input(
                    "refine_iterations",
                    default=DEFAULT_REFINE_CAP,
                    min=0,
                    max=200,
                    tooltip=(
                        "At most this many fixed-point iterations per step; they make the inversion an exact inverse of "
                        "deterministic DDIM and stop once converged (tolerance). 0 = plain DDIM inversion as in the paper."
                    ),
                ),
                io.Conditioning.Input("negative", optional=True, tooltip="Needed only when cfg is not 1."),
                io.Float.Input(
                    "tolerance",
                    default=editing.DEFAULT_TOLERANCE,
                    min=1e-9,
                    max=0.1,
                    step=1e-7,
                    round=False,
                    optional=True,
                    tooltip=(
                        "A step's refinement stops once an iteration moves the latent by at most this, relative, or when it "
                        "stops improving (the model's precision). Smaller reconstructs more exactly and costs more model calls."
                    ),
                ),
            ],
            outputs=[io.Latent.Output(display_name="inverted_latent")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, latent, sigmas, cfg, refine_iterations, negative=None, tolerance=None) -> io.NodeOutput:
        steps = max(int(sigmas.shape[-1]) - 1, 0)
        progress = NodeProgress(cls.hidden.unique_id, steps)
        tolerance = editing.DEFAULT_TOLERANCE if tolerance is None else tolerance

        def callback(step, _x0, _x, total):
            progress(step + 1, total)

        log.info(
            "SVDiff: DDIM inversion over %d steps (at most %d refinements per step, tolerance %g)", steps, refine_iterations, tolerance
        )
        result = comfy_editing.invert(
            model, positive, latent, sigmas, cfg, negative, refine_iterations, callback=callback, tolerance=tolerance
        )
        summary = result.summary()
        log.info("SVDiff: %s", summary)
        if result.reconstruction_error is not None and result.reconstruction_error > RECONSTRUCTION_WARNING:
            log.warning(
                "SVDiff: the inverted latent samples back to the image only within %.2f%%; raise refine_iterations, lower "
                "tolerance or use more steps for a more faithful edit",
                100 * result.reconstruction_error,
            )
        out = {key: value for key, value in latent.items() if key not in ("samples", "noise_mask")}
        # "samples" holds the variance-preserving z_T (about unit variance) so previews and
        # downstream latent nodes see a sensible tensor; the sampler start is kept alongside.
        out["samples"] = result.vp_latent()
        out[comfy_editing.INVERSION_KEY] = result
        return io.NodeOutput(out, ui=ui.PreviewText(summary))


class SVDiffInvertedNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffInvertedNoise",
            display_name="Noise from Inverted Latent (SVDiff)",
            category=EDIT_CATEGORY,
            description=(
                "A NOISE for SamplerCustomAdvanced that starts sampling at the inverted latent, optionally "
                "spherically interpolated towards fresh seeded noise by alpha (paper eq. 7). alpha = 0 keeps the "
                "inversion (small edits), alpha = 1 is fresh noise, the same as RandomNoise with this seed on an "
                "empty latent. The paper uses alpha = 0, or 0.9 with eta 0.9 for large changes."
            ),
            inputs=[
                io.Latent.Input("inverted_latent", tooltip="The output of DDIM Inversion (SVDiff)."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1.0, step=0.01, round=False),
            ],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, inverted_latent, noise_seed, alpha) -> io.NodeOutput:
        result = inverted_latent.get(comfy_editing.INVERSION_KEY)
        if result is None:
            raise ValueError(
                "inverted_latent does not come from DDIM Inversion (SVDiff); connect that node's LATENT output here "
                "(an ordinary latent carries no inversion)"
            )
        return io.NodeOutput(comfy_editing.InvertedNoise(result, noise_seed, alpha))


class SVDiffDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffDDIMSampler",
            display_name="DDIM Sampler η (SVDiff)",
            category=EDIT_CATEGORY,
            description=(
                "DDIM with its η (Song et al.): 0 is deterministic, larger adds fresh noise at every step "
                "(the paper edits with 0.5, and 0.9 for large changes). Works for ε-, v-prediction and flow models."
            ),
            inputs=[
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01, round=False),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=10.0, step=0.01, round=False),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta, s_noise=1.0) -> io.NodeOutput:
        return io.NodeOutput(comfy_editing.ddim_sampler(eta, s_noise))


NODES = [SVDiffDDIMInversion, SVDiffInvertedNoise, SVDiffDDIMSampler]
