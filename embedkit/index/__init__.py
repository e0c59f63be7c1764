"""The ANN index over OUT/vectors.lance: parameter choice, training, out-of-core build, search."""
