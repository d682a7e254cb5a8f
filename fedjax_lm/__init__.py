"""fedjax_lm: vectorized federated fine-tuning of Transformer language models in JAX."""

__version__ = "0.1.0"

import logging as _logging

# transformers warns at import that PyTorch is missing; here that is by design (JAX models,
# tokenizers only), and the line in every run and sweep cell buries the warnings that matter.
_logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in record.getMessage()
)
