"""loradem: several data sources, one model, the DEM way, LoRA-native.

    recipe.yaml -> train (one adapter per source) -> vectors -> search
                -> assemble (exact streamed fold) -> eval -> report
"""

__version__ = "0.1.0"

from loradem.errors import LorademError  # noqa: E402

__all__ = ["LorademError", "__version__"]
