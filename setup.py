"""Build of pangu_ops: the Python packages plus the C++ CPU kernels (`pangu_ops._C`).

The backend folders sit at the top of the repository (csrc/, benchmarks/, triton_kernels/)
but install under the pangu_ops namespace, never as top-level modules.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# -march=native: the extension is compiled on the machine that runs it (pip install builds it).
# Set PANGU_OPS_PORTABLE=1 to build a binary that runs on any x86-64.
# -fno-math-errno: sqrt and friends without the errno branch that keeps loops from vectorising
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
if os.environ.get("PANGU_OPS_PORTABLE") != "1":
    cxx_flags.append("-march=native")

setup(
    packages=["pangu_ops", "pangu_ops.ops", "pangu_ops.backends", "pangu_ops.backends.triton_ascend", "pangu_ops.nn",
              "pangu_ops.distributed", "pangu_ops.ecss", "pangu_ops.integrations", "pangu_ops.benchmarks",
              "pangu_ops.triton_kernels", "pangu_ops.ascend_kernels"],
    package_dir={"pangu_ops.benchmarks": "benchmarks", "pangu_ops.triton_kernels": "triton_kernels",
                 "pangu_ops.ascend_kernels": "ascend_kernels"},
    # the AscendC sources travel with the package: the CPU twin compiles them on first use
    package_data={"pangu_ops.ascend_kernels": ["*.cpp", "*.h", "CMakeLists.txt", "cpu_twin/*.h", "cpu_twin/*.cpp",
                                               "cpu_twin/lib/*.h", "cpu_twin/kernel_tiling/*.h"]},
    ext_modules=[
        CppExtension(
            "pangu_ops._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
