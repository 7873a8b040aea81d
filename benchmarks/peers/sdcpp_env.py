"""stable-diffusion.cpp's own virtual environment (benchmarks/.venv-sdcpp, gitignored): stable-diffusion-cpp-python,
which builds stable-diffusion.cpp and ggml from source with CMake on install (several minutes on 2 cores; ggml
is built for this CPU, as its users' pip install does). Pinned by sdcpp-constraints.txt. Standard library only.

    python benchmarks/peers/sdcpp_env.py create
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__:
    from .peer_env import PeerEnv
else:  # run as a script
    from peer_env import PeerEnv

HERE = Path(__file__).resolve().parent
ENV = PeerEnv(
    name="stable-diffusion.cpp",
    venv=HERE.parent / ".venv-sdcpp",
    requirements=("stable-diffusion-cpp-python", "numpy"),
    constraints=HERE / "sdcpp-constraints.txt",
    probe="import stable_diffusion_cpp",
    pip_env={"CMAKE_BUILD_PARALLEL_LEVEL": "2"},  # the machine's 2 cores; CMake's default is 1
)

if __name__ == "__main__":
    print(ENV.create())
    sys.exit(0)
