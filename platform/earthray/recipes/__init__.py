"""Pretraining recipes (one file each) behind one interface and one registry."""

from earthray.recipes.base import (
    Batch,
    Recipe,
    RecipeConfig,
    count_parameters,
    create_recipe,
    get_recipe_class,
    list_recipes,
    paper_inputs,
    register_recipe,
    resolve_config,
)

__all__ = [
    "Batch", "Recipe", "RecipeConfig", "count_parameters", "create_recipe", "get_recipe_class",
    "list_recipes", "paper_inputs", "register_recipe", "resolve_config",
]

from earthray.recipes import mars, msgfm, ofa, skysense  # noqa: E402,F401  (importing registers them)
