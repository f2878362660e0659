"""A procedural text-to-image world for models whose pictures mean something.

Scenes of one or two objects (shape, colour, texture, size, position) on a background,
captions that name every attribute, pictures drawn with PIL (seeded), and an evaluator
trained on the world's ground truth that scores a picture per attribute, and per half
for two-object prompts. Pure numpy/PIL/torch: no ComfyUI.

Modules: :mod:`~devtools.world.scenes` (vocabulary, scenes, captions, what is held out),
:mod:`~devtools.world.render` (pictures), :mod:`~devtools.world.evaluator` (the classifier,
its training and scoring). ``python -m devtools.world`` trains the evaluator and reports
its accuracy on fresh scenes.
"""

from .render import render
from .scenes import ATTRIBUTES, BASE_SHAPES, CONCEPT_SHAPES, HELD_OUT_COMBINATIONS, SHAPES, Scene, Thing, evaluator_scene, random_scene

__all__ = [
    "ATTRIBUTES",
    "BASE_SHAPES",
    "CONCEPT_SHAPES",
    "HELD_OUT_COMBINATIONS",
    "SHAPES",
    "Scene",
    "Thing",
    "evaluator_scene",
    "random_scene",
    "render",
]
