"""Hyperparameter search for continual-learning methods.

Example (as in the Neurenix continual-learning API)::

    from neurenix.automl import GridSearch

    grid_search = GridSearch(model_fn=create_ewc_model, param_space=param_space, scoring="accuracy", cv=3)
    grid_search.fit(X, y)                 # or fit(tasks=benchmark): average accuracy over a sequence
    best_params = grid_search.best_params()
"""

from neurenix.automl.grid_search import GridSearch, default_optimizer, parameter_grid, stratified_folds

__all__ = ["GridSearch", "default_optimizer", "parameter_grid", "stratified_folds"]
