"""Pneumonia screening on PneumoniaMNIST: the library behind the DVC stages in stages/."""
import os

# TensorFlow's C++ start-up chatter hides the stage's own progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
