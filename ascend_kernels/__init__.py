"""pangu_ops' AscendC kernel sources (C++), their CMake build, the torch_npu binding and the CPU
twin that runs them on a CPU; the Python side is `pangu_ops.backends.ascend`."""
