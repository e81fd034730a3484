"""C++ and CUDA sources of mtcore's kernels, shipped as package data for the lazy build."""
