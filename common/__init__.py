"""Framework-neutral building blocks shared by train_torch/ and train_tf/.

Nothing in this package imports torch or tensorflow.
"""
