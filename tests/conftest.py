import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
