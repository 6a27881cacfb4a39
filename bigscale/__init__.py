"""bigscale: Hydra-composed DeepSpeed fine-tuning of Hugging Face causal LMs."""

from bigscale.lazy_imports import skip_unused_optional_imports

__version__ = "0.1.0"

# Before any bigscale module imports DeepSpeed (see bigscale.lazy_imports).
skip_unused_optional_imports()
