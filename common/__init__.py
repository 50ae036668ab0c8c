"""Framework-neutral building blocks shared by train_torch/ and train_tf/.

Nothing in this package imports torch or tensorflow.
"""

import os

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout common/ lives in
