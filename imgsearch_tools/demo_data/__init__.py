"""Seeded synthetic catalogue in the Unsplash Lite layout, with drawn images and planted tastes."""

from imgsearch_tools.demo_data.commands import add_commands
from imgsearch_tools.demo_data.drawing import COLOUR_RGB, COLOURS, SCENE_RGB, SCENES, SHAPES
from imgsearch_tools.demo_data.folder import check_folder, generated_by
from imgsearch_tools.demo_data.tables import GENERATOR_VERSION, generate


def query_families(catalogue) -> tuple[dict[str, list[str]], tuple[str, str] | None] | None:
    """The demo's query families for CLIP's held-out figure, when ``catalogue`` has their words.

    Colour, shape and scene words, with colour+shape pairs; None for another catalogue (CLIP
    then uses its most frequent keywords and pairs).
    """
    vocabulary = set(map(str, catalogue.keywords["keyword"].unique()))
    families = {"colour": list(COLOURS), "shape": list(SHAPES), "scene": list(SCENES)}
    if all(word in vocabulary for words in families.values() for word in words):
        return families, ("colour", "shape")
    return None


__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "GENERATOR_VERSION",
    "SCENES",
    "SCENE_RGB",
    "SHAPES",
    "add_commands",
    "check_folder",
    "generate",
    "generated_by",
    "query_families",
]
