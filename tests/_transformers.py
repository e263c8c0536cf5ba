"""What differs between the transformers releases the suite runs on."""

import transformers
from packaging.version import Version

# transformers 5.24 renamed generate's and the decoder layers' cache keyword from past_key_values to
# cache (the old name warns, and goes in 6.0).
CACHE_KEYWORD = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
