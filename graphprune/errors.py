"""The errors graphprune raises. Each says what was wrong and what to do about it."""


class GraphpruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class UnsupportedModelError(GraphpruneError):
    """The model's class or graph lacks an anatomy element a stage or pass needs."""

    def __init__(self, model_class: str, element: str, hint: str = ""):
        self.model_class, self.element = model_class, element
        msg = f"{model_class}: could not find the {element}"
        super().__init__(msg + (f". {hint}" if hint else ""))


class PassConfigError(GraphpruneError, ValueError):
    """A pass or pipeline was given options it cannot honour (checked before any work)."""


class PassNotApplicable(GraphpruneError):
    """A pass cannot act on this model or graph; raised instead of silently not pruning."""


class GraphVerificationError(GraphpruneError):
    """A rewritten graph failed the checks run after a pass."""


class InputError(GraphpruneError, ValueError):
    """Model inputs that graphprune cannot prune as asked (checked before running graphs)."""


class NothingPrunedWarning(UserWarning):
    """A pruned model that will not (or did not) remove any token: budgets at or above the vision
    tokens there are, or a pipeline of passes that only mark or cut caches."""


class ShapeBucketWarning(UserWarning):
    """A vision encoder captured for a new shape bucket (patch grid, image size): once per bucket, at most
    Family.vision_buckets of them per pruned model."""
