"""The base class of every config section: unknown keys are errors and field docstrings become
the descriptions in `stoker config schema`, so editors show them."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)
